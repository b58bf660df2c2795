"""Speculative decoding: drafters (drafter.py: prompt lookup; draft_model.py: a draft checkpoint) and the
verification of their drafts (verify.py)."""
