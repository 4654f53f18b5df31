"""Distilling a speculative-decoding draft from a target model (`python -m jaxinfer.distill`).

prompts.py   the requests the target answers (topics split into training and held-out)
data.py      the target's outputs through the engine, cached
draft.py     the draft's config, reduced-head token ids and first weights
train.py     optax training and the held-out greedy acceptance proxy
pipeline.py  one run end to end, the saved checkpoint and its report
"""
