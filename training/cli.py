"""Command lines: ``newllm train``, ``newllm eval``, ``newllm runs`` and the extra
``python -m training`` tools.

    newllm train --preset tiny-infini --data $DATA/gutenberg/train.txt --out runs/a \\
        --steps 2000
    newllm train --config runs/a/config.yaml --out runs/b     # the same run again, in runs/b
    newllm runs compare runs/a runs/b --out compare.png       # table + curves
    newllm eval --checkpoint runs/a --data $DATA/gutenberg/val.txt --memory --passkey
    python -m training tokenizer --data train.txt --vocab-size 8192 --out tokenizer.json
    python -m training phase1 --preset tiny-context-pythia --data train.txt --out runs/p1
    python -m training lct-speed --preset tiny-context-pythia
    torchrun --nproc-per-node 2 -m training train --data ... --out ...

Each ``*_main(argv)`` returns a process exit code: 0 on success, 2 for bad input (with a one-line
``error: ...`` on stderr saying what to change).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from training.options import add_dataclass_arguments, dataclass_from_args


def _run(fn: Callable[[], Any]) -> int:
    try:
        result = fn()
    except (ValueError, FileNotFoundError, NotADirectoryError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except _Interrupted:
        return 130
    except KeyboardInterrupt:
        print("interrupted (nothing saved: it came before the first step, or twice)",
              file=sys.stderr)
        return 130
    if result is not None:
        print(json.dumps(result, indent=1, default=str))
    return 0


def _parser(prog: str, description: str, cls: type) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_dataclass_arguments(parser, cls)
    return parser


# train ------------------------------------------------------------------------------------------
def train_main(argv: list[str] | None = None) -> int:
    """``newllm train``: Phase 2 language-model training (see `training.lm`)."""
    from training.config import TrainConfig
    from training.lm import train

    parser = _parser("newllm train", "Train a language model (Phase 2). Every run writes all "
                     "its settings to OUT/config.yaml: `newllm train --config RUN/config.yaml "
                     "--out NEW` reruns it in NEW (without --out it continues RUN). Curves: "
                     "`tensorboard --logdir OUT/tb`; runs side by side: `newllm runs compare "
                     "RUN...`; more in training/README.md.",
                     TrainConfig)
    parser.add_argument("--config", metavar="FILE", default=None,
                        help="YAML (or .json) file of settings: its keys are these flags "
                             "without the dashes (batch-size or batch_size), its values of the "
                             "flags' types; flags given here override it")
    pre = argparse.ArgumentParser(prog="newllm train", add_help=False)
    pre.add_argument("--config", default=None)
    config_file = pre.parse_known_args(argv)[0].config

    def go() -> dict[str, Any] | None:
        if config_file is not None:  # the file's settings become the flags' defaults
            from training.run_config import read_run_config

            parser.set_defaults(**read_run_config(config_file, TrainConfig))
        args = parser.parse_args(argv)
        summary = train(dataclass_from_args(TrainConfig, args))
        if summary.get("interrupted"):  # saved where it stopped: say how to go on, exit 130
            argv_ = list(sys.argv[1:] if argv is None else argv)
            resume = shlex.join(["newllm", "train", *argv_,
                                 *([] if "--resume" in argv_ else ["--resume"])])
            if os.environ.get("RANK", "0") == "0":
                print(f"interrupted ({summary['interrupted']}) at step {summary['steps']}; "
                      f"checkpoint {summary['checkpoint']}\nresume with:\n  {resume}",
                      file=sys.stderr)
            raise _Interrupted
        return summary if os.environ.get("RANK", "0") == "0" else None  # rank 0 reports
    return _run(go)


class _Interrupted(Exception):
    """Training stopped on a signal after saving (exit 130; the resume command was printed)."""


# eval -------------------------------------------------------------------------------------------
@dataclass
class EvalConfig:
    """Settings of ``newllm eval``; prints a JSON report."""

    checkpoint: str = ""
    """checkpoint folder, GPT-NeoX folder or preset name ('' = the bundled default model)"""
    data: tuple[str, ...] = ()
    """text files, folders or JSONL for perplexity; every document is scored on its own"""
    window: int = 0
    """sliding window in tokens (0 = the length the checkpoint was trained on, when its run
    folder records it; else 4 x segment_len)"""
    stride: int = 0
    """tokens the window moves by (0 = window / 2)"""
    max_docs: int = 0
    """score only the first this many documents (0 = all)"""
    max_tokens: int = 0
    """score only the first this many tokens of each document (0 = all)"""
    memory: bool = False
    """also report perplexity with the memory carried through each document against the memory
    reset every segment"""
    passkey: bool = False
    """report passkey retrieval accuracy by distance in segments"""
    passkey_distances: tuple[int, ...] = (0, 1, 2, 4)
    """distances (in segments) between the pass key and the question"""
    passkey_trials: int = 20
    """examples per distance"""
    passkey_filler: str = ""
    """a text file whose prose fills the passkey examples and the copy test (default: the
    repeated grass/sky/sun sentences)"""
    passkey_keys: tuple[str, ...] = ("digits",)
    """what the keys are: digits (five, "The pass key is N.", reported as passkey) and/or
    words (a word of the filler's prose, "The secret word is W.", reported as passkey_words)"""
    copy_test: bool = False
    """report in-context copying (the induction-head test): the loss of a span of random words
    on its first pass and on its repeat, at --copy-distances segments apart (0 = repeated at
    once in the same segment), filled with --passkey-filler's prose"""
    copy_distances: tuple[int, ...] = (0, 1, 4)
    """segments between the span's first pass and its repeat"""
    copy_span: int = 0
    """tokens per copied span (0 = a quarter of a segment)"""
    copy_trials: int = 20
    """spans per distance"""
    reversal_curse: str = ""
    """reversal-curse name_description_dataset folder: report forward/backward perplexity"""
    reversal_direction: str = "p2d"
    """the direction the model was trained on: p2d or d2p"""
    reversal_limit: int = 0
    """use only the first this many pairs of each file (0 = all)"""
    device: str = "cpu"
    """cpu, cuda, ..."""
    threads: int = 0
    """torch CPU threads (0 = torch's default)"""
    out: str = ""
    """also write the JSON report to this file"""


def trained_length(checkpoint: str) -> int | None:
    """The example length a run folder's training used (from its latest checkpoint's
    ``trainer_state.json``), or None when the folder records none."""
    folder = Path(checkpoint) if checkpoint else None
    if folder is None or not folder.is_dir():
        return None
    from training.train_state import STATE_JSON, list_checkpoints

    found = [folder / STATE_JSON] if (folder / STATE_JSON).is_file() else []
    found += [c / STATE_JSON for c in list_checkpoints(folder)[-1:]]
    for path in found:
        try:
            length = json.loads(path.read_text()).get("example_length")
        except (OSError, ValueError):
            continue
        if isinstance(length, int) and length > 0:
            return length
    return None


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """Run every evaluation ``cfg`` asks for and return the report."""
    import torch

    from newllm.checkpoint import load_checkpoint
    from training import data as D
    from training.evaluate import (
        copy_test,
        document_ids,
        has_memory,
        memory_benefit,
        passkey_accuracy,
        perplexity,
        reversal_curse,
    )

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if not (cfg.data or cfg.passkey or cfg.copy_test or cfg.reversal_curse):
        raise ValueError("nothing to evaluate: give --data, --passkey, --copy-test or "
                         "--reversal-curse")
    unknown = sorted(set(cfg.passkey_keys) - {"digits", "words"})
    if unknown or not cfg.passkey_keys:
        raise ValueError(f"--passkey-keys takes digits and/or words, got {unknown or 'nothing'}")
    model, tok = load_checkpoint(cfg.checkpoint or None, device=cfg.device)
    model.eval()
    S = model.config.segment_len
    report: dict[str, Any] = {"checkpoint": cfg.checkpoint or "default",
                              "model": model.config.name, "parameters": model.num_parameters()}
    if cfg.data:
        docs = D.read_documents(cfg.data)[: cfg.max_docs or None]
        ids = [(name, document_ids(tok, text, cfg.max_tokens)) for name, text in docs]
        trained = trained_length(cfg.checkpoint)
        window = cfg.window or trained or 4 * S
        stride = cfg.stride or max(1, window // 2)
        report["perplexity"] = perplexity(model, ids, window, stride)
        report["perplexity"]["window_from"] = (
            "--window" if cfg.window else "the training length" if trained
            else "4 x segment_len (no training length recorded)")
        if trained:
            report["perplexity"]["trained_length"] = trained
        if trained and window > trained and not has_memory(model):
            warning = (f"window {window} is longer than the {trained} tokens this model was "
                       "trained on, and it has no memory: its perplexity will rise for reasons "
                       "that are not the text")
            report["perplexity"]["warning"] = warning
            print(f"warning: {warning}", file=sys.stderr)
        if cfg.memory and not has_memory(model):
            report["memory"] = {"skipped": "the model has no memory layers"}
        elif cfg.memory:
            report["memory"] = memory_benefit(model, ids)
    filler = (Path(cfg.passkey_filler).read_text(encoding="utf-8")[:200_000]
              if cfg.passkey_filler and (cfg.passkey or cfg.copy_test) else None)
    if cfg.copy_test:
        report["copy"] = copy_test(model, tok, cfg.copy_distances, cfg.copy_trials,
                                   span=cfg.copy_span, filler_text=filler)
    if cfg.passkey:
        for keys in cfg.passkey_keys:
            report["passkey" if keys == "digits" else "passkey_words"] = passkey_accuracy(
                model, tok, cfg.passkey_distances, cfg.passkey_trials, filler_text=filler,
                words=keys == "words")
    if cfg.reversal_curse:
        report["reversal_curse"] = reversal_curse(model, tok, cfg.reversal_curse,
                                                  cfg.reversal_direction, cfg.reversal_limit)
    if cfg.out:
        Path(cfg.out).write_text(json.dumps(report, indent=1) + "\n")
    return report


def eval_main(argv: list[str] | None = None) -> int:
    """``newllm eval``: perplexity, memory benefit, passkey retrieval, reversal curse."""
    parser = _parser("newllm eval", "Evaluate a checkpoint; prints a JSON report.", EvalConfig)
    args = parser.parse_args(argv)
    return _run(lambda: evaluate(dataclass_from_args(EvalConfig, args)))


# extra tools ------------------------------------------------------------------------------------
@dataclass
class TokenizerConfig:
    """Settings of ``python -m training tokenizer``."""

    data: tuple[str, ...] = ()
    """text files, folders or JSONL to train on"""
    vocab_size: int = 8192
    """tokens in the vocabulary, <|endoftext|> (id 0) and the 256 bytes included"""
    min_frequency: int = 2
    """merge only pairs seen at least this often"""
    out: str = "tokenizer.json"
    """where to write tokenizer.json"""


def tokenizer_main(argv: list[str] | None = None) -> int:
    parser = _parser("python -m training tokenizer", "Train a byte-level BPE tokenizer.",
                     TokenizerConfig)
    cfg = dataclass_from_args(TokenizerConfig, parser.parse_args(argv))

    def go() -> dict[str, Any]:
        from training.data import read_documents
        from training.tokenizer_train import train_tokenizer

        if not cfg.data:
            raise ValueError("--data is required")
        tok = train_tokenizer((t for _, t in read_documents(cfg.data)), cfg.vocab_size,
                              min_frequency=cfg.min_frequency, path=cfg.out)
        return {"out": cfg.out, "vocab_size": tok.vocab_size, "sha256": tok.sha256}
    return _run(go)


def phase1_main(argv: list[str] | None = None) -> int:
    from training.phase1 import Phase1Config, run_phase1

    parser = _parser("python -m training phase1", "Train a context block (Phase 1).",
                     Phase1Config)
    args = parser.parse_args(argv)
    return _run(lambda: run_phase1(dataclass_from_args(Phase1Config, args)))


@dataclass
class SpeedConfig:
    """Settings of ``python -m training lct-speed``."""

    preset: str = "tiny-context-pythia"
    """a context model preset"""
    seq_len: int = 128
    """sequence length of the measured training step"""
    batch_size: int = 8
    """examples per step"""
    repeats: int = 3
    """best of this many runs"""


def lct_speed_main(argv: list[str] | None = None) -> int:
    parser = _parser("python -m training lct-speed",
                     "Time a training step: sequential recurrence vs Lagged Cache Training.",
                     SpeedConfig)
    cfg = dataclass_from_args(SpeedConfig, parser.parse_args(argv))

    def go() -> dict[str, Any]:
        import torch

        from newllm.config import ModelConfig
        from newllm.model import TransformerLM
        from training.lct import lct_speed

        torch.manual_seed(0)
        model = TransformerLM(ModelConfig.from_name(cfg.preset))
        result = lct_speed(model, cfg.seq_len, cfg.batch_size, cfg.repeats)
        if result["speedup"] < 1:
            print(f"warning: the whole training step is {1 / result['speedup']:.2f}x SLOWER "
                  "with Lagged Cache Training than sequentially at this setting (the lagged "
                  "pass saves time only in the context block; here the rest of the step "
                  "dominates)", file=sys.stderr)
        return {**asdict(cfg), **result, "explain": LCT_EXPLAINED}
    return _run(go)


LCT_EXPLAINED = {
    "speedup": "whole training step (forward + backward of the model): sequential context "
               "recurrence / one lagged parallel pass; what training time changes by",
    "block_speedup": "the context block alone, the same two ways: what LCT itself buys; the "
                     "whole step gains less, since the layers above cost the same either way",
    "seeds": "the seeds reported a 22x speed-up for LCT; the project's notes do not record "
             "their setting (model, sequence length, device), so compare settings before "
             "comparing numbers: the block speed-up grows with the sequence length",
}


# runs -------------------------------------------------------------------------------------------
def runs_main(argv: list[str] | None = None) -> int:
    """``newllm runs compare RUN [RUN ...]``: a table and a PNG of training runs (see
    `training.compare`)."""
    from training.compare import EVAL_FILE

    parser = argparse.ArgumentParser(prog="newllm runs", description="Look at training runs.")
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    cmp = sub.add_parser(
        "compare", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="table and curves of several runs",
        description="Print a table of training runs (steps, tokens, training time, final and "
                    "best training loss, validation perplexity, memory gain, pass-key recall; "
                    f"and the figures of RUN/{EVAL_FILE} when newllm eval wrote one there with "
                    f"--out RUN/{EVAL_FILE}) and write a PNG of their loss, validation "
                    "perplexity, memory gain and pass-key curves against the step. A value a "
                    "run does not hold shows as '-'.")
    cmp.add_argument("runs", nargs="+", metavar="RUN", help="--out folders of newllm train")
    cmp.add_argument("--out", default="compare.png",
                     help="where to write the PNG ('' = no PNG)")
    cmp.add_argument("--json", action="store_true",
                     help="print the table's values as JSON instead of the table")
    args = parser.parse_args(argv)

    from training.compare import compare

    return _run(lambda: compare(args.runs, args.out, args.json))


COMMANDS: dict[str, Callable[[list[str] | None], int]] = {
    "train": train_main, "eval": eval_main, "tokenizer": tokenizer_main, "phase1": phase1_main,
    "lct-speed": lct_speed_main, "runs": runs_main,
}


def main(argv: list[str] | None = None) -> int:
    """``python -m training COMMAND ...``; without a command, ``train``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in COMMANDS:
        return COMMANDS[argv[0]](argv[1:])
    if argv and argv[0] in ("-h", "--help"):
        print(f"usage: python -m training {{{','.join(COMMANDS)}}} ... "
              "(no command = train; COMMAND --help for its flags)")
        return 0
    if argv and not argv[0].startswith("-"):
        print(f"error: unknown command {argv[0]!r}; choose from {sorted(COMMANDS)}",
              file=sys.stderr)
        return 2
    return train_main(argv)
