"""Cleanup passes: dead-code elimination, common-subexpression elimination, constant folding.

All three are bit-exact: each removed, merged or precomputed value equals what the program
computed before, to the last bit.
"""
