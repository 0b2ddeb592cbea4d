"""newllm training: data pipeline, Phase 1 (context block), Phase 2 (language modelling), Lagged
Cache Training, evaluation and the ``newllm train`` / ``newllm eval`` command lines.

Modules: `training.data` (documents -> EOS-joined token stream -> windows, token cache),
`training.tokenizer_train` (byte-level BPE), `training.config` (`TrainConfig`),
`training.optim` (parameter groups, schedule), `training.lm` (`Trainer`, `train`),
`training.train_state` (checkpoints without pickle), `training.evaluate` (sliding-window
perplexity, memory benefit, passkey, reversal curse), `training.phase1`, `training.lct`,
`training.distributed`, `training.cli`.
"""
