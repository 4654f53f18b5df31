"""Evaluations of a loaded model through the serving engine.

perplexity.py   perplexity of a text, scored window by window with prompt logprobs through the paged cache
"""
