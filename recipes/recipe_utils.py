"""What the recipes share: arguments, a safe output directory, text data, the tokenizer, plots, the model card.

Each recipe reads top to bottom like transformers' `run_clm.py` and takes only these steps from here. They need
the `recipes` extra (`pip install "hf-signopt[recipes]"`: datasets, pyyaml, jinja2, matplotlib); the library
itself does not.
"""

import contextlib
import dataclasses
import importlib.util
import json
import logging
import math
import shutil
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
import torch
import transformers
import yaml
from accelerate.utils import broadcast_object_list
from datasets import DatasetDict, load_dataset
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import HfArgumentParser, PreTrainedTokenizerFast, TrainingArguments, set_seed
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

logger = logging.getLogger(__name__)

RECIPES = Path(__file__).resolve().parent
CORPUS = RECIPES / "data" / "tinyshakespeare.txt"
"""The shipped Tiny Shakespeare corpus (public domain, 1,115,394 bytes; see `data/README.md`)."""
CORPUS_NAME = "tinyshakespeare"
MODEL_CARD_TEMPLATE = RECIPES.parent / "model_cards" / "causal_lm.md"
END_OF_TEXT = "<|endoftext|>"
FILE_BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".csv": "csv"}

TRAINING_DEFAULTS = {
    "weight_decay": 0.1,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0.05,
    "per_device_train_batch_size": 16,
    "per_device_eval_batch_size": 32,
    "eval_strategy": "steps",
    "logging_steps": 10,
    "save_strategy": "steps",
    "save_total_limit": 1,
    "seed": 42,
    "report_to": "none",
}
"""`TrainingArguments` defaults every recipe shares; each recipe adds its own steps, rate and output dir."""


@dataclasses.dataclass
class DataArguments:
    """Which text to train and evaluate on, and how to cut it into blocks (the shipped corpus by default)."""

    dataset_name: str | None = dataclasses.field(default=None, metadata={"help": "A datasets hub name or dir."})
    dataset_config_name: str | None = dataclasses.field(default=None, metadata={"help": "Its configuration."})
    train_file: str | None = dataclasses.field(default=None, metadata={"help": "Local .txt, .json(l) or .csv."})
    validation_file: str | None = dataclasses.field(default=None, metadata={"help": "Local validation file."})
    text_column: str = dataclasses.field(default="text", metadata={"help": "Column holding the text."})
    validation_split_percentage: float = dataclasses.field(
        default=5.0, metadata={"help": "Percent of train rows held out (the tail) when no validation split exists."}
    )
    block_size: int = dataclasses.field(default=128, metadata={"help": "Tokens per training block, >= 2."})

    def __post_init__(self) -> None:
        if self.dataset_name is not None and self.train_file is not None:
            raise ValueError("Give either --dataset_name or --train_file, not both.")
        if self.validation_file is not None and self.train_file is None:
            raise ValueError(f"--validation_file {self.validation_file!r} needs --train_file too.")
        for path in (self.train_file, self.validation_file):
            if path is not None and Path(path).suffix.lower() not in FILE_BUILDERS:
                raise ValueError(f"Cannot read {path!r}: the extension must be one of {sorted(FILE_BUILDERS)}.")
            if path is not None and not Path(path).is_file():
                raise FileNotFoundError(f"Data file {path!r} does not exist.")
        if not 0 < self.validation_split_percentage < 100:
            raise ValueError(
                f"validation_split_percentage must be in (0, 100), got {self.validation_split_percentage}."
            )
        if self.block_size < 2:
            raise ValueError(f"block_size must be >= 2, got {self.block_size}.")

    @property
    def label(self) -> str:
        """The data's name for logs and model cards."""
        return self.dataset_name or (Path(self.train_file).name if self.train_file else CORPUS_NAME)


@dataclasses.dataclass
class RunArguments:
    """What a recipe does around training: the output directory's safety, plots, the sample at the end."""

    overwrite_output_dir: bool = dataclasses.field(
        default=False, metadata={"help": "Train into an output directory that already holds a run."}
    )
    make_plots: bool = dataclasses.field(default=True, metadata={"help": "Write PNG plots."})
    sample_prompt: str = dataclasses.field(
        default="ROMEO:", metadata={"help": "Prompt of the final sample; '' for none."}
    )
    sample_max_new_tokens: int = dataclasses.field(default=48, metadata={"help": "Sample length, in [1, 1024]."})

    def __post_init__(self) -> None:
        if not 1 <= self.sample_max_new_tokens <= 1024:
            raise ValueError(f"sample_max_new_tokens must be in [1, 1024], got {self.sample_max_new_tokens}.")
        if self.make_plots and importlib.util.find_spec("matplotlib") is None:  # say so before training, not after
            raise ImportError('Plots need matplotlib: pip install "hf-signopt[recipes]", or pass --no_make_plots.')


def parse_arguments(types: Sequence[type], defaults: Mapping[str, Any], argv: Sequence[str] | None) -> tuple:
    """Parses `argv` (default `sys.argv[1:]`) into `types`: recipe defaults < a YAML/JSON file given first < flags.

    The recipe's defaults and the file's values become the parser's defaults, so `--help` shows what a run uses.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    values = dict(defaults)
    if argv and argv[0].endswith((".yaml", ".yml", ".json")):
        path = Path(argv.pop(0))
        if not path.is_file():
            raise FileNotFoundError(f"Config file {str(path)!r} does not exist.")
        loaded = (json.loads if path.suffix == ".json" else yaml.safe_load)(path.read_text(encoding="utf-8"))
        if not isinstance(loaded, dict):
            raise ValueError(f"Config file {str(path)!r} must hold a mapping of argument names to values.")
        values |= loaded
    known = {field.name for dtype in types for field in dataclasses.fields(dtype) if field.init}
    if unknown := sorted(set(values) - known):
        raise ValueError(f"Unknown argument(s) {unknown} in the recipe defaults or config file.")
    parser = HfArgumentParser(types)
    parser.set_defaults(**values)
    return parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)


def setup_logging(training_args: TrainingArguments) -> None:
    """Recipe messages at INFO on the main process; transformers and datasets at the Trainer's log level."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        handlers=[logging.StreamHandler(sys.stdout)], force=True)
    logging.getLogger().setLevel(logging.INFO if training_args.should_log else logging.WARNING)
    level = training_args.get_process_log_level()
    transformers.utils.logging.set_verbosity(level)
    datasets.utils.logging.set_verbosity(level)
    datasets.disable_progress_bars()
    if not torch.accelerator.is_available():
        training_args.dataloader_pin_memory = False  # pinned memory only helps copies to an accelerator


def resolve_output_dir(training_args: TrainingArguments, run_args: RunArguments) -> str | None:
    """Returns the checkpoint to resume from, after making sure that nothing trained before is lost.

    `--resume_from_checkpoint last` continues the newest `checkpoint-*` of the output directory. Without it, an
    output directory that already holds anything is refused unless `--overwrite_output_dir` is given.
    """
    output_dir, resume = Path(training_args.output_dir), training_args.resume_from_checkpoint
    if resume == "last":
        last = get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
        if last is None:
            raise FileNotFoundError(f"--resume_from_checkpoint last: no checkpoint-* directory in {str(output_dir)!r}.")
        return last
    if resume is not None:
        if not Path(resume).is_dir():
            raise FileNotFoundError(f"--resume_from_checkpoint {resume!r} is not a directory.")
        return resume
    if output_dir.is_dir() and any(output_dir.iterdir()):
        if not run_args.overwrite_output_dir:
            what = "a trained model" if (output_dir / "config.json").is_file() else "files"
            raise FileExistsError(
                f"Output directory {str(output_dir)!r} already holds {what}. Pass --overwrite_output_dir to replace "
                "it, --resume_from_checkpoint last to continue it, or choose another --output_dir."
            )
        if training_args.process_index == 0:  # or a later `--resume_from_checkpoint last` would continue the old run
            for checkpoint in output_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
                logger.warning("--overwrite_output_dir: removing %s of the run being replaced", checkpoint)
                shutil.rmtree(checkpoint)
    return None


@contextlib.contextmanager
def removed_on_failure(output_dir: str) -> Iterator[None]:
    """A run that fails leaves no trace: an output directory it created is removed if it holds no file yet."""
    path = Path(output_dir)
    existed = path.exists()
    try:
        yield
    except BaseException:
        if not existed and path.is_dir() and not any(child.is_file() for child in path.rglob("*")):
            shutil.rmtree(path)
        raise


def comparison_runs(training_args: TrainingArguments, run_args: RunArguments,
                    variants: Mapping[str, Mapping[str, Any]]) -> dict[str, TrainingArguments]:
    """The `TrainingArguments` of each run of a comparison, in `<output_dir>/<name>/`, built before anything trains.

    Building them validates them (an unknown `optim` fails here). `--resume_from_checkpoint last` continues each
    run that has a checkpoint and starts the others afresh; otherwise the comparison's directory must be new (or
    `--overwrite_output_dir` given).
    """
    resume, output_dir = training_args.resume_from_checkpoint, Path(training_args.output_dir)
    if resume not in (None, "last"):
        raise ValueError(f"A comparison resumes each run from its own checkpoints: use --resume_from_checkpoint "
                         f"last, not {resume!r}.")
    if resume is None:
        resolve_output_dir(training_args, run_args)
    runs = {}
    for name, changes in variants.items():
        run_dir = output_dir / name
        has_checkpoint = run_dir.is_dir() and get_last_checkpoint(str(run_dir)) is not None
        runs[name] = dataclasses.replace(training_args, **changes, output_dir=str(run_dir),
                                         resume_from_checkpoint="last" if resume and has_checkpoint else None)
    return runs


def log_start(training_args: TrainingArguments, model: torch.nn.Module, data_args: DataArguments) -> None:
    """One line saying where the outputs go and what is about to train."""
    parameters = sum(p.numel() for p in model.parameters())
    logger.info(
        "Training %s (%.2fM parameters) on %s with optim=%s, lr %g, %d steps, %d process(es) on %s; outputs in %s",
        type(model).__name__, parameters / 1e6, data_args.label, optimizer_name(training_args),
        training_args.learning_rate, training_args.max_steps, training_args.world_size, training_args.device,
        training_args.output_dir,
    )


def optimizer_name(training_args: TrainingArguments) -> str:
    """The `optim` name as a plain string (`TrainingArguments` may hold an enum member)."""
    return str(getattr(training_args.optim, "value", training_args.optim))


def load_text(data_args: DataArguments) -> DatasetDict:
    """Loads `train` and `validation` text splits; without a validation split the tail of train becomes one."""
    if data_args.dataset_name is not None:
        raw = load_dataset(data_args.dataset_name, data_args.dataset_config_name)
    else:
        def read(path: str) -> Any:
            builder = FILE_BUILDERS[Path(path).suffix.lower()]
            extra = {"keep_linebreaks": True} if builder == "text" else {}
            return load_dataset(builder, data_files={"train": path}, split="train", **extra)

        raw = DatasetDict(train=read(data_args.train_file or str(CORPUS)))
        if data_args.validation_file is not None:
            raw["validation"] = read(data_args.validation_file)
    if "validation" not in raw:
        train = raw["train"]
        held_out = int(len(train) * data_args.validation_split_percentage / 100)
        if not 1 <= held_out < len(train):
            raise ValueError(f"{data_args.validation_split_percentage}% of {len(train)} rows leaves {held_out} "
                             "validation rows; give more data, a larger percentage or a validation file.")
        # The contiguous tail, so that no neighbouring line of a document leaks across.
        raw = DatasetDict(train=train.select(range(len(train) - held_out)),
                          validation=train.select(range(len(train) - held_out, len(train))))
    for split in ("train", "validation"):
        if data_args.text_column not in raw[split].column_names:
            raise ValueError(f"The {split} split has no column {data_args.text_column!r}; it has "
                             f"{raw[split].column_names}. Set --text_column.")
    return DatasetDict(train=raw["train"], validation=raw["validation"])


def train_tokenizer(texts: Sequence[str], vocab_size: int, model_max_length: int,
                    training_args: TrainingArguments) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (GPT-2 style) trained on `texts` by the main process and sent to the others.

    Nothing is written to disk: the tokenizer is saved with the model, after training.
    """
    if vocab_size < 257:
        raise ValueError(f"tokenizer_vocab_size must be >= 257 (256 bytes + {END_OF_TEXT}), got {vocab_size}.")
    payload = [None]
    if training_args.process_index == 0:
        bpe = Tokenizer(models.BPE())
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = decoders.ByteLevel()
        bpe.post_processor = processors.ByteLevel(trim_offsets=False)
        bpe.train_from_iterator(texts, trainer=trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=2, special_tokens=[END_OF_TEXT], show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ))
        payload = [bpe.to_str()]
    if training_args.world_size > 1:
        broadcast_object_list(payload)
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(payload[0]), bos_token=END_OF_TEXT, eos_token=END_OF_TEXT,
        unk_token=END_OF_TEXT, pad_token=END_OF_TEXT, model_max_length=model_max_length,
    )


def tokenize_into_blocks(raw: DatasetDict, tokenizer: Any, data_args: DataArguments,
                         training_args: TrainingArguments) -> DatasetDict:
    """Tokenizes each split as one stream and cuts it into `block_size` blocks (`labels` = `input_ids`)."""
    block_size = data_args.block_size
    if block_size > tokenizer.model_max_length:
        raise ValueError(f"block_size={block_size} exceeds the tokenizer's model_max_length "
                         f"{tokenizer.model_max_length}; use --block_size in [2, {tokenizer.model_max_length}].")

    def tokenize_and_group(batch: dict[str, list]) -> dict[str, list]:
        ids = [token for row in tokenizer(batch[data_args.text_column])["input_ids"] for token in row]
        blocks = [ids[start:start + block_size] for start in range(0, len(ids) - block_size + 1, block_size)]
        return {"input_ids": blocks, "attention_mask": [[1] * block_size for _ in blocks], "labels": blocks}

    with training_args.main_process_first(desc="tokenizing"):
        blocks = raw.map(tokenize_and_group, batched=True, batch_size=10_000, remove_columns=raw["train"].column_names)
    for split, dataset in blocks.items():
        if len(dataset) == 0:
            raise ValueError(f"The {split} split has fewer than block_size={block_size} tokens; "
                             "give more text or a smaller --block_size.")
    logger.info("Blocks of %d tokens: %d train, %d validation", block_size, len(blocks["train"]),
                len(blocks["validation"]))
    return blocks


def perplexity(loss: float) -> float:
    """`exp(loss)`, infinite where it overflows."""
    return math.exp(loss) if loss < 700 else math.inf


def generate_sample(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int, seed: int) -> str:
    """Samples a continuation of `prompt` (top-k 50, temperature 0.8): prompt + continuation."""
    set_seed(seed)
    inputs = tokenizer(prompt, return_tensors="pt").to(model.device)
    output = model.eval().generate(**inputs, max_new_tokens=max_new_tokens, do_sample=True, top_k=50,
                                   temperature=0.8, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(output[0], skip_special_tokens=True)


def series(log_history: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """`(steps, values)` of one metric in a Trainer's log history."""
    entries = [entry for entry in log_history if key in entry]
    return [entry["step"] for entry in entries], [float(entry[key]) for entry in entries]


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure  # drawn off-screen, no display needed

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def plot_curves(curves: Mapping[str, tuple[list, list]], path: Path, title: str, ylabel: str) -> None:
    """One line per non-empty `(steps, values)` curve."""
    figure = _figure(6.4, 4.0)
    axes = figure.add_subplot()
    for label, (steps, values) in curves.items():
        if steps:
            axes.plot(steps, values, label=label, marker="o" if len(steps) <= 20 else None, markersize=3)
    axes.set(title=title, xlabel="step", ylabel=ylabel)
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.savefig(path)


def plot_sweep(panels: Mapping[str, Mapping[str, Sequence[tuple[float, float, bool]]]], path: Path, title: str,
               xlabel: str, ylabel: str) -> None:
    """One panel per key of `panels` (log x, shared y), one line per series of `(x, y, marked)` points.

    The line joins a series' unmarked points; a marked point (a run that went wrong) is a red cross. The y range is
    that of the unmarked finite points (of all finite points if none is unmarked); a value off that range or not
    finite is drawn at its edge.
    """
    values = [(y, marked) for series in panels.values() for points in series.values() for _, y, marked in points]
    healthy = [y for y, marked in values if math.isfinite(y) and not marked]
    finite = healthy or [y for y, _ in values if math.isfinite(y)]
    low, high = (min(finite), max(finite)) if finite else (0.0, 1.0)
    margin = 0.05 * (high - low) or 0.1
    low, high = low - margin, high + margin

    def shown(y: float) -> float:
        return min(max(y, low), high) if math.isfinite(y) else high

    figure = _figure(1.0 + 3.4 * len(panels), 3.8)
    for axes, (panel, series) in zip(figure.subplots(1, len(panels), squeeze=False, sharey=True)[0], panels.items()):
        for label, points in series.items():
            kept = sorted((x, shown(y)) for x, y, marked in points if not marked)
            axes.plot([x for x, _ in kept], [y for _, y in kept], marker="o", markersize=4, label=label)
            if crosses := [(x, shown(y)) for x, y, marked in points if marked]:
                axes.scatter(*zip(*crosses), marker="x", s=60, color="red", zorder=3, clip_on=False)
        axes.set(title=panel, xscale="log", xlabel=xlabel, ylim=(low, high))
        axes.grid(True, alpha=0.3)
        axes.legend(fontsize="small")
    figure.axes[0].set_ylabel(ylabel)
    figure.suptitle(title)
    figure.savefig(path)


def plot_expert_load(loads: Mapping[str, Sequence[Sequence[int]]], path: Path, title: str) -> None:
    """One heat map per run: rows are layers, columns experts, colour the load over the layer's mean load."""
    from matplotlib.colors import TwoSlopeNorm

    relative = {label: [[count * len(row) / max(sum(row), 1) for count in row] for row in matrix]
                for label, matrix in loads.items()}
    layers, experts = len(next(iter(relative.values()))), len(next(iter(relative.values()))[0])
    figure = _figure(max(4.0, 1.2 + 0.55 * experts) * len(relative), 1.6 + 0.5 * layers)
    highest = max(2.0, max(value for matrix in relative.values() for row in matrix for value in row))
    norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=highest)  # white is perfect balance
    for axes, (label, matrix) in zip(figure.subplots(1, len(relative), squeeze=False)[0], relative.items()):
        image = axes.imshow(matrix, cmap="RdBu_r", norm=norm, aspect="auto")
        axes.set(title=label, xlabel="expert", ylabel="layer", xticks=range(experts), yticks=range(layers))
    figure.colorbar(image, ax=figure.axes, label="load / mean load")
    figure.suptitle(title)
    figure.savefig(path)


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Mapping[str, str]) -> str:
    """Rows as a Markdown table; `columns` maps row keys to headers."""
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4f}"
        return " ".join(f"{v:.2f}" for v in value) if isinstance(value, (list, tuple)) else str(value)

    lines = ["| " + " | ".join(columns.values()) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(cell(row[key]) for key in columns) + " |" for row in rows])


OPTIMIZER_DESCRIPTIONS = {
    "lion": "Lion (Chen et al. 2023): `p -= lr * sign(beta1 * m + (1 - beta1) * g)`, "
            "`m = beta2 * m + (1 - beta2) * g`.",
    "signum": "Signum (Bernstein et al. 2018): `m = mu * m + (1 - mu) * g`, `p -= lr * sign(m)`.",
    "signsgd": "signSGD (Bernstein et al. 2018): `p -= lr * sign(g)`; no state.",
    "signmomentum": "sign momentum: `m = mu * m + (1 - mu) * sign(g)`, `p -= lr * m`.",
    "simba": "Simba: a windowed integer counter `s` of gradient signs (1-2 bytes per parameter); the step is "
             "`sign(s)` where `|s|` exceeds `threshold * w`, else `sign(g)`.",
}
"""One line on each sign optimizer for the model card."""


def write_model_card(trainer: Any, *, recipe: str, dataset: str, metrics: Mapping[str, float],
                     routing: Mapping[str, Any] | None, plots: Sequence[tuple[str, str]], prompt: str,
                     base_model: str | None = None, base_model_on_hub: bool = False) -> None:
    """Renders `model_cards/causal_lm.md` into the output directory's `README.md` with hub metadata.

    `base_model` names the model fine-tuned from; it enters the hub metadata only when it is a hub name.
    """
    model, args, optimizer = trainer.model, trainer.args, getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    name = optimizer_name(args)
    hyperparameters = {k: v for k, v in optimizer.defaults.items()
                       if isinstance(v, (int, float, str, tuple)) and k not in ("foreach", "fused", "differentiable")}
    training = {
        "max_steps": trainer.state.max_steps, "per_device_train_batch_size": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps, "processes": args.world_size,
        "learning_rate": args.learning_rate,
        "lr_scheduler_type": str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)),
        "weight_decay": args.weight_decay, "seed": args.seed,
    }
    tags = (["moe"] + (["loss-free-balancing"] if routing["balancing"] == "loss-free" else [])) if routing else []
    card_data = ModelCardData(
        library_name="transformers", pipeline_tag="text-generation", tags=[*tags, name], datasets=[dataset],
        base_model=base_model if base_model_on_hub else None, model_name=Path(args.output_dir).resolve().name,
        eval_results=[EvalResult(task_type="text-generation", dataset_type=dataset, dataset_name=dataset,
                                 dataset_split="validation", metric_type=key, metric_value=float(value))
                      for key, value in metrics.items() if key in ("eval_loss", "perplexity", "maxvio_global")],
    )

    def fmt(values: Mapping[str, Any]) -> dict[str, str]:
        return {key: f"{value:.4g}" if isinstance(value, float) else str(value) for key, value in values.items()}

    card = ModelCard.from_template(
        card_data, template_path=str(MODEL_CARD_TEMPLATE), model_name=card_data.model_name, recipe=recipe,
        dataset_label=dataset, model_type=model.config.model_type, base_model=base_model,
        num_parameters=f"{sum(p.numel() for p in model.parameters()):,}", optimizer_name=name,
        optimizer_description=OPTIMIZER_DESCRIPTIONS.get(name, ""), routing=routing, plots=list(plots), prompt=prompt,
        metrics=fmt(metrics), training=fmt(training), optimizer_hyperparameters=fmt(hyperparameters),
    )
    card.save(str(Path(args.output_dir) / "README.md"))
