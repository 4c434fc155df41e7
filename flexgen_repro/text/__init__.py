"""The text job's parts: the model and policy it runs (model.py), prompts as blocks and ids back
as completions (batching.py), and the JSONL files of the command line (jsonl.py)."""
