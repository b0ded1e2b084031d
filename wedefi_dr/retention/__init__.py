"""Data retention by classification: the policy and its batched, lossless execution."""
