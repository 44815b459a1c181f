"""Data: tokenizers, the R1 chat template, procedural tasks and grain pipelines.

Modules: `tokenizer` (CharTokenizer, HFTokenizer, get_tokenizer), `template` (format_prompt,
format_completion), `tasks` (arithmetic_records, arithmetic_splits, reasoning_gym_records),
`pipeline` (read_records, sft_batches, prompt_batches, write_jsonl).
"""
