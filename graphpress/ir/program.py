"""The Program: one ``torch.export`` graph with its weights, signature and metadata.

Invariant kept by every method here (and checked by :meth:`Program.validate` after each pass):

* the graph's placeholders and ``graph_signature.input_specs`` correspond one to one, in order;
* every parameter/buffer spec names a tensor of the state dict (parameters as ``nn.Parameter``),
  every constant spec a tensor of ``constants``, and the placeholder's ``meta["val"]`` has that
  tensor's shape and dtype;
* the output node's values correspond one to one to ``graph_signature.output_specs``.

Passes edit weights only through :meth:`add_weight`, :meth:`replace_weight` and
:meth:`remove_weight`, which keep all three in step. Weight tensors are never mutated in place:
a rewrite stores a new tensor, and a run stores a mutated buffer's new value as a new tensor,
so :meth:`copy` shares tensors safely and a copy taken before a pass stays valid. What leaves
the Program owns its memory: :meth:`module` (the thing users train) holds a copy of the weights.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, InputSpec, OutputKind, TensorArgument
from torch.fx import GraphModule, Node
from torch.utils import _pytree as pytree

from graphpress.errors import MetadataError
from graphpress.ir.shapes import fake_over_meta, no_dispatch_modes

__all__ = ["Program", "WEIGHT_KINDS"]

_META = torch.device("meta")

WEIGHT_KINDS = {
    "parameter": InputKind.PARAMETER,
    "buffer": InputKind.BUFFER,
    "constant": InputKind.CONSTANT_TENSOR,
}
_PREFIX = {InputKind.PARAMETER: "p_", InputKind.BUFFER: "b_", InputKind.CONSTANT_TENSOR: "c_"}


def _owned(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of a weight that shares no memory with it (parameters stay parameters)."""
    copy = tensor.detach().clone()
    if isinstance(tensor, torch.nn.Parameter):
        return torch.nn.Parameter(copy, requires_grad=tensor.requires_grad)
    return copy


@dataclass
class _SpecIndex:
    key: tuple[int, int]                # (id, length) of the input spec list
    by_node: dict[str, InputSpec]       # placeholder name -> its input spec
    weight_nodes: dict[str, str]        # weight name -> placeholder name
    placeholders: dict[str, Node]       # placeholder name -> node


class Program:
    """A traced model: an ExportedProgram plus graphpress bookkeeping (version, analyses)."""

    def __init__(self, exported: ExportedProgram, *, frontend: str = "export") -> None:
        self._ep = exported
        self.frontend = frontend
        self.version = 0
        self.passes_applied: list[str] = []  # provenance: each pass run on it, as described
        self._analyses: dict[str, tuple[int, Any]] = {}
        self._module: tuple[int, torch.nn.Module] | None = None
        self._compiled_version = -1
        self._spec_index: _SpecIndex | None = None
        self._fake_mode: Any = None

    # ------------------------------------------------------------------ views
    @property
    def exported_program(self) -> ExportedProgram:
        return self._ep

    @property
    def graph_module(self) -> GraphModule:
        return self._ep.graph_module

    @property
    def graph(self) -> torch.fx.Graph:
        return self._ep.graph_module.graph

    @property
    def signature(self) -> Any:
        return self._ep.graph_signature

    @property
    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._ep.state_dict

    @property
    def constants(self) -> dict[str, Any]:
        return self._ep.constants

    def nodes(self, op: str | None = None) -> Iterator[Node]:
        if op == "placeholder":  # indexed by torch.fx: no scan of the whole graph
            return iter(self.graph.find_nodes(op=op))
        return (n for n in self.graph.nodes if op is None or n.op == op)

    def num_nodes(self) -> int:
        return sum(1 for n in self.graph.nodes if n.op not in ("placeholder", "output"))

    def _index(self) -> _SpecIndex:
        """Lookup tables over the input specs. ``add_weight`` and ``remove_weight`` keep them
        current; any other change of the spec list (its identity or length) rebuilds them."""
        specs = self.signature.input_specs
        key = (id(specs), len(specs))
        if self._spec_index is None or self._spec_index.key != key:
            by_node = {s.arg.name: s for s in specs if isinstance(s.arg, TensorArgument)}
            weight_nodes = {s.target: name for name, s in by_node.items()
                            if s.kind in WEIGHT_KINDS.values()}
            placeholders = {n.name: n for n in self.nodes("placeholder")}
            self._spec_index = _SpecIndex(key, by_node, weight_nodes, placeholders)
        return self._spec_index

    def _specs_by_node(self) -> dict[str, InputSpec]:
        return self._index().by_node

    def input_kind(self, node: Node) -> InputKind | None:
        """The signature kind of a placeholder (PARAMETER, BUFFER, USER_INPUT, ...), else None."""
        if node.op != "placeholder":
            return None
        spec = self._specs_by_node().get(node.name)
        return spec.kind if spec is not None else None

    def is_weight(self, node: Node) -> bool:
        return self.input_kind(node) in WEIGHT_KINDS.values()

    def weight_name(self, node: Node) -> str | None:
        """Fully qualified name of the weight a placeholder stands for (``layer1.conv.weight``)."""
        spec = self._specs_by_node().get(node.name) if node.op == "placeholder" else None
        if spec is None or spec.kind not in WEIGHT_KINDS.values():
            return None
        return spec.target

    def mutated_weights(self) -> set[str]:
        """Names of the buffers (and parameters) the program writes: the targets of its
        BUFFER_MUTATION / PARAMETER_MUTATION outputs. Their values change from call to call."""
        kinds = (OutputKind.BUFFER_MUTATION, OutputKind.PARAMETER_MUTATION)
        return {s.target for s in self.signature.output_specs if s.kind in kinds}

    def is_constant(self, node: Node) -> bool:
        """A weight whose value is the same on every call: a weight the program never writes."""
        return self.is_weight(node) and self.weight_name(node) not in self.mutated_weights()

    def weight(self, node_or_name: Node | str) -> torch.Tensor:
        """The tensor of a weight, by placeholder node or fully qualified name."""
        name = self._resolve_name(node_or_name)
        if name in self.state_dict:
            return self.state_dict[name]
        return self.constants[name]

    def weights(self) -> dict[str, torch.Tensor]:
        """Every weight by fully qualified name: parameters, buffers and constant tensors."""
        out: dict[str, torch.Tensor] = {}
        for spec in self.signature.input_specs:
            if spec.kind in WEIGHT_KINDS.values():
                out[spec.target] = self.weight(spec.target)
        return out

    def weight_placeholders(self) -> dict[str, str]:
        """Placeholder name -> the fully qualified name of the weight it stands for, for every
        weight placeholder (one lookup table instead of a ``weight_name`` call per node)."""
        return {node: weight for weight, node in self._index().weight_nodes.items()}

    def weight_node(self, name: str) -> Node:
        index = self._index()
        if name in index.weight_nodes:
            return index.placeholders[index.weight_nodes[name]]
        known = ", ".join(sorted(self.weights())[:10])
        raise KeyError(f"no weight named {name!r} in the program (some known: {known})")

    def user_inputs(self) -> list[Node]:
        kinds = self._specs_by_node()
        return [n for n in self.nodes("placeholder")
                if kinds.get(n.name) is not None and kinds[n.name].kind == InputKind.USER_INPUT]

    def output_node(self) -> Node:
        return self.graph.output_node()

    def source_module(self, node: Node) -> str:
        """Path of the module that produced a node (``encoder.layer.0.attention``), or ''."""
        stack = node.meta.get("nn_module_stack")
        if not stack:
            return ""
        path = list(stack.values())[-1][0]
        return path.removeprefix("L['self'].").removeprefix("L__self__.")

    # ---------------------------------------------------------------- editing
    def _resolve_name(self, node_or_name: Node | str) -> str:
        if isinstance(node_or_name, Node):
            name = self.weight_name(node_or_name)
            if name is None:
                raise ValueError(f"node {node_or_name.name!r} is not a weight placeholder")
            return name
        return node_or_name

    def fake_mode(self) -> Any:
        """The graph's FakeTensorMode (found once; every fake value of this graph uses it)."""
        if self._fake_mode is None:
            from graphpress.ir.shapes import fake_mode_of

            self._fake_mode = fake_mode_of(self)
        return self._fake_mode

    def _fake(self, tensor: torch.Tensor) -> torch.Tensor:
        """The fake value of a weight. A plain dense tensor's is built directly (what
        ``from_tensor`` builds for it: same sizes, strides, dtype, device, ``requires_grad`` and
        parameter flag, about 30x faster); anything else goes through ``from_tensor``."""
        mode = self.fake_mode()
        with no_dispatch_modes():
            kind = type(tensor)
            if ((kind is torch.nn.Parameter or kind is torch.Tensor)
                    and tensor.layout == torch.strided and tensor.storage_offset() == 0
                    and not (tensor.is_quantized or tensor.is_conj() or tensor.is_neg())):
                device = tensor.device
                if device.type != "meta" or mode.allow_meta:
                    elem = torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype,
                                               device=_META, requires_grad=tensor.requires_grad)
                    return fake_over_meta(mode, elem, device, is_param=kind is torch.nn.Parameter)
            return mode.from_tensor(tensor, static_shapes=True)

    def add_weight(self, name: str, tensor: torch.Tensor, *, kind: str = "parameter",
                   persistent: bool = True) -> Node:
        """Add a weight and its placeholder; returns the placeholder node to wire into the graph."""
        if kind not in WEIGHT_KINDS:
            raise ValueError(f"kind must be one of {sorted(WEIGHT_KINDS)}, got {kind!r}")
        if name in self.state_dict or name in self.constants:
            raise ValueError(f"a weight named {name!r} already exists; pick a new name")
        input_kind = WEIGHT_KINDS[kind]
        tensor = tensor.detach()
        if input_kind == InputKind.PARAMETER:
            tensor = torch.nn.Parameter(tensor, requires_grad=tensor.is_floating_point())
        # weights precede user inputs (torch.export's calling convention): insert before the first
        specs, index = self.signature.input_specs, self._index()
        position = next((i for i, s in enumerate(specs) if s.kind == InputKind.USER_INPUT),
                        len(specs))
        candidate = _PREFIX[input_kind] + name.replace(".", "_")
        if position < len(specs):
            with self.graph.inserting_before(index.placeholders[specs[position].arg.name]):
                node = self.graph.placeholder(candidate)
        else:
            with self.graph.inserting_after(list(self.nodes("placeholder"))[-1]):
                node = self.graph.placeholder(candidate)
        node.meta["val"] = self._fake(tensor)
        spec = InputSpec(
            kind=input_kind, arg=TensorArgument(name=node.name), target=name,
            persistent=persistent if input_kind == InputKind.BUFFER else None,
        )
        specs.insert(position, spec)
        index.by_node[node.name] = spec
        index.weight_nodes[name] = node.name
        index.placeholders[node.name] = node
        index.key = (id(specs), len(specs))
        if input_kind == InputKind.CONSTANT_TENSOR or (
            input_kind == InputKind.BUFFER and not persistent
        ):
            self.constants[name] = tensor
        else:
            self.state_dict[name] = tensor
        self.touch()
        return node

    def free_weight_name(self, base: str) -> str:
        """``base``, or ``base2``, ``base3``, ... : the first name no weight has yet."""
        name, i = base, 1
        while name in self.state_dict or name in self.constants:
            i += 1
            name = f"{base}{i}"
        return name

    def replace_weight(self, node_or_name: Node | str, tensor: torch.Tensor) -> Node:
        """Store a new tensor for a weight (shape may change); updates the placeholder's meta.
        Returns the placeholder."""
        return self.replace_weights({self._resolve_name(node_or_name): tensor})[0]

    def replace_weights(self, tensors: dict[str, torch.Tensor]) -> list[Node]:
        """``replace_weight`` for several weights by name, in one pass over the tables;
        returns their placeholders in order."""
        state = self.state_dict
        nodes = []
        for name, tensor in tensors.items():
            node = self.weight_node(name)
            store = state if name in state else self.constants
            old = store[name]
            if isinstance(old, torch.nn.Parameter):    # a new tensor object without history
                tensor = torch.nn.Parameter(tensor, requires_grad=old.requires_grad)
            else:
                tensor = tensor.detach()
            store[name] = tensor
            node.meta["val"] = self._fake(tensor)
            nodes.append(node)
        self.touch()
        return nodes

    def remove_weight(self, node_or_name: Node | str) -> None:
        """Remove an unused weight: its placeholder, its spec and its tensor."""
        name = self._resolve_name(node_or_name)
        node = self.weight_node(name)
        if node.users:
            users = ", ".join(u.name for u in node.users)
            raise ValueError(f"weight {name!r} is still used by {users}; rewire them first")
        index = self._index()
        self.signature.input_specs.remove(index.by_node.pop(node.name))
        del index.weight_nodes[name], index.placeholders[node.name]
        index.key = (id(self.signature.input_specs), len(self.signature.input_specs))
        self.graph.erase_node(node)
        self.state_dict.pop(name, None)
        self.constants.pop(name, None)
        self.touch()

    def refresh_shapes(self) -> None:
        """Recompute every node's ``meta["val"]`` after a rewrite that changes shapes on purpose."""
        from graphpress.ir.shapes import propagate_shapes

        self.set_analysis("shapes", propagate_shapes(self, check=False))

    def sync_output_specs(self) -> None:
        """Point each output spec at the value the output node now returns (a pass that
        replaces a returned node, like cse merging two outputs, leaves the old name)."""
        for spec, value in zip(self.signature.output_specs, self.output_node().args[0]):
            if (isinstance(spec.arg, TensorArgument) and isinstance(value, Node)
                    and spec.arg.name != value.name):
                spec.arg = TensorArgument(name=value.name)

    def touch(self) -> None:
        """Record that the Program changed: cached analyses and the runnable module go stale."""
        self.version += 1

    # --------------------------------------------------------------- analyses
    def analysis(self, name: str) -> Any:
        """Run (or reuse, if the Program has not changed since) a registered analysis."""
        from graphpress.ir.analyses import run_analysis

        cached = self._analyses.get(name)
        if cached is not None and cached[0] == self.version:
            return cached[1]
        value = run_analysis(name, self)
        self._analyses[name] = (self.version, value)
        return value

    def set_analysis(self, name: str, value: Any) -> None:
        """Record an analysis computed elsewhere as valid at the current version."""
        self._analyses[name] = (self.version, value)

    def keep_analyses(self, names: tuple[str, ...]) -> None:
        """Mark the named cached analyses as still valid at the current version."""
        for name in names:
            if name in self._analyses:
                self._analyses[name] = (self.version, self._analyses[name][1])

    # ---------------------------------------------------------------- running
    def module(self) -> torch.nn.Module:
        """The program as a stand-alone ``nn.Module`` (``ExportedProgram.module()``; rebuilt
        only after a change) that owns a copy of the weights: training it or running its buffer
        mutations never changes this Program, its copies, or the user's model."""
        if self._module is None or self._module[0] != self.version:
            self.graph_module.recompile()
            owned = self.copy()
            for store in (owned.state_dict, owned.constants):
                for name, value in store.items():
                    if isinstance(value, torch.Tensor):
                        store[name] = _owned(value)
            self._module = (self.version, owned.exported_program.module())
        return self._module[1]

    def flat_inputs(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Any]:
        """The graph's placeholder values for a call: the weights, then the user inputs
        flattened by the traced input spec (torch.export's calling convention)."""
        return list(self._ep._graph_module_flat_inputs(args, kwargs))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the graph: weights, then the flattened user inputs, in placeholder order.

        Buffer mutations the graph returns are stored as the buffers' new values; user-input
        mutations are copied into the caller's tensors, as eager PyTorch would have done.
        """
        if self._compiled_version != self.version:
            self.graph_module.recompile()
            self._compiled_version = self.version
        return self.call_flat(self.graph_module, args, kwargs)

    def call_flat(self, runner: Callable[..., Any], args: tuple[Any, ...],
                  kwargs: dict[str, Any]) -> Any:
        """Call ``runner`` (the graph module, or a backend's compiled form of it) with the
        placeholder values of a call, then apply the outputs as :meth:`__call__` documents."""
        flat = self.flat_inputs(args, kwargs)
        user_positions = [i for i, spec in enumerate(self.signature.input_specs)
                          if spec.kind == InputKind.USER_INPUT]
        if not torch.is_grad_enabled():
            # a weight computed from parameters (a folded one) must look like it did when the
            # graph computed it: not requiring grad; some kernels (SDPA's attn_mask) pick
            # another algorithm for tensors that require grad, even under no_grad
            users = set(user_positions)
            flat = [v.detach() if i not in users and isinstance(v, torch.Tensor) else v
                    for i, v in enumerate(flat)]
        outputs = runner(*flat)
        user_names = {self.signature.input_specs[i].arg.name: i for i in user_positions}
        results = []
        for spec, value in zip(self.signature.output_specs, outputs):
            if spec.kind == OutputKind.USER_OUTPUT:
                results.append(value)
            elif spec.kind == OutputKind.BUFFER_MUTATION:
                store = self.state_dict if spec.target in self.state_dict else self.constants
                store[spec.target] = value.detach()
            elif spec.kind == OutputKind.USER_INPUT_MUTATION:
                flat[user_names[spec.target]].copy_(value)
        return pytree.tree_unflatten(results, self._ep.call_spec.out_spec)

    def copy(self) -> Program:
        """A copy whose graph can be edited independently; weight tensors are shared (never
        mutated in place, see the module docstring)."""
        graph = torch.fx.Graph()
        value_map: dict[Node, Node] = {}
        out = graph.graph_copy(self.graph, value_map)
        graph.output(out)
        for old, new in value_map.items():  # fx renames names that shadow builtins ("input")
            if new.name != old.name:
                new.name = old.name
                graph._graph_namespace._rename_object(new, old.name)
        output_meta = self.output_node().meta
        graph.output_node().meta.update(output_meta)
        gm = GraphModule(self.graph_module, graph)
        gm.meta.update(self.graph_module.meta)
        ep = ExportedProgram(
            root=gm, graph=gm.graph, graph_signature=copy.deepcopy(self.signature),
            state_dict=dict(self.state_dict), range_constraints=dict(self._ep.range_constraints),
            module_call_graph=list(self._ep.module_call_graph),
            constants=dict(self.constants), verifiers=self._ep.verifiers,
        )
        clone = Program(ep, frontend=self.frontend)
        clone.version = self.version
        clone.passes_applied = list(self.passes_applied)
        shapes = self._analyses.get("shapes")
        if shapes is not None and shapes[0] == self.version:  # the copy shares the meta objects
            clone._analyses["shapes"] = shapes
        clone._fake_mode = self._fake_mode     # the mode of those shared fake values
        return clone

    # ------------------------------------------------------------- validation
    def validate(self, *, who: str = "") -> None:
        """Check the invariant of the module docstring; raise MetadataError naming ``who``."""
        by = f" after {who}" if who else ""
        try:
            self.graph.lint()
        except Exception as exc:  # torch raises RuntimeError with the offending node
            raise MetadataError(f"graph lint failed{by}: {exc}") from exc
        placeholders = list(self.nodes("placeholder"))
        specs = self.signature.input_specs
        if len(placeholders) != len(specs):
            raise MetadataError(
                f"stale signature{by}: {len(placeholders)} placeholders but {len(specs)} input "
                "specs; add/remove weights with Program.add_weight/remove_weight")
        for node, spec in zip(placeholders, specs):
            if getattr(spec.arg, "name", node.name) != node.name:
                raise MetadataError(
                    f"stale signature{by}: placeholder {node.name!r} is described by spec of "
                    f"{spec.arg.name!r}; keep placeholders and input specs in the same order")
            if spec.kind in WEIGHT_KINDS.values():
                self._check_weight(node, spec, by)
        outputs = self.output_node().args[0]
        if len(outputs) != len(self.signature.output_specs):
            raise MetadataError(
                f"stale signature{by}: graph returns {len(outputs)} values but the signature "
                f"has {len(self.signature.output_specs)} output specs")
        for value, spec in zip(outputs, self.signature.output_specs):
            if isinstance(value, Node) and getattr(spec.arg, "name", value.name) != value.name:
                raise MetadataError(
                    f"stale signature{by}: output {value.name!r} is described by the spec of "
                    f"{spec.arg.name!r}; call Program.sync_output_specs()")
        for node in self.graph.nodes:
            if node.op not in ("output", "get_attr") and "val" not in node.meta:
                raise MetadataError(f"node {node.name!r}{by} has no meta['val']")

    def _check_weight(self, node: Node, spec: InputSpec, by: str) -> None:
        store = self.state_dict if spec.target in self.state_dict else self.constants
        if spec.target not in store:
            raise MetadataError(
                f"stale state dict{by}: {spec.target!r} is in the signature but has no tensor")
        tensor = store[spec.target]
        if spec.kind == InputKind.PARAMETER and not isinstance(tensor, torch.nn.Parameter):
            raise MetadataError(f"parameter {spec.target!r}{by} is not an nn.Parameter")
        val = node.meta.get("val")
        if val is None or tuple(val.shape) != tuple(tensor.shape) or val.dtype != tensor.dtype:
            shape = None if val is None else (tuple(val.shape), val.dtype)
            raise MetadataError(
                f"stale shape metadata{by}: weight {spec.target!r} is "
                f"{tuple(tensor.shape)} {tensor.dtype} but its placeholder says {shape}; "
                "use Program.replace_weight to change weights")
