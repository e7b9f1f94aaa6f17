"""Evaluation of trained models, beside training on top of the model (no DeepSpeed):

    tasks/        the evaluation tasks, one module each (ppl, positions, passkey, recall), and their registry
                  (dsv4.evaluation.tasks.TASKS): what `python -m dsv4.evaluate` iterates
    losses.py     validation loss / perplexity, loss by position bucket, indexer recall and sink mass
    passkey.py    the passkey retrieval task's prompts and scoring: accuracy by length and depth
    recall.py     the recall task's held-out documents and scoring: accuracy by distance, indexer hit rate
    data.py       what evaluation reads: the run's validation split, its settings, held-out documents
    decoding.py   greedy_continue: the one decoding function every task uses
    harness.py    the lm-evaluation-harness backend (`python -m dsv4.evaluation.harness --model dsv4 ...`)

`python -m dsv4.evaluate` (dsv4/evaluate.py) is the command; models load through dsv4.loading.load_model.
"""
