"""Evaluation of trained models, beside training on top of the model (no DeepSpeed):

    losses.py     validation loss / perplexity, loss by position bucket, indexer recall and sink mass
    passkey.py    the passkey retrieval task: seeded prompts, greedy decoding, accuracy by length and depth
    decoding.py   greedy_continue: the one decoding function every task uses
    harness.py    the lm-evaluation-harness backend (`python -m dsv4.evaluation.harness --model dsv4 ...`)

`python -m dsv4.evaluate` (dsv4/evaluate.py) is the command; models load through dsv4.loading.load_model.
"""
