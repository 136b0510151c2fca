"""Training recipes: one YAML file -> typed, validated dataclasses, with `--section.key=value` overrides.

mode:      pretrain (default) | sft (full fine-tuning) | lora (sft with adapters on a frozen base)
           | quietstar (train the model to think before each token; text data)
           | dpo (preference tuning on prompt / chosen / rejected pairs; with a `lora:` section, adapters only)
model:     {preset: tiny-moe, overrides: {hidden_size: 128}}   (or {config: {...}}, or {path: DIR} to start from)
tokenizer: {path: DIR}  or  {train_vocab_size: 4096}            (train a byte-level BPE on the data)
data:      DataConfig   (sources with weights, seq_len, validation split)
optim:     OptimConfig  (AdamW or Muon + AdamW)
schedule:  ScheduleConfig (cosine or WSD; warm-up in steps or as a fraction of the run, 5% by default)
run:       RunConfig    (length, batch, checkpoints, logging, devices)
lora:      LoRAConfig   (rank, alpha, dropout, target modules): train adapters on the frozen base instead of every
           parameter, under any mode but pretrain (mode lora: sft with adapters, defaults when absent); with
           quietstar the thinking head and meta embeddings train fully beside them (modules_to_save: thinking)
quietstar: QuietStarConfig (thought length, talk-ahead tokens, thoughts per position, policy weight; mode
           quietstar only)
dpo:       DPOConfig    (beta, label_smoothing, loss_type sigmoid | ipo; mode dpo only)

A section that the mode cannot use is an error, never ignored.

The run's length (max_steps, max_tokens or max_epochs) and the warm-up (warmup_steps or warmup_fraction) are
each one of alternatives: one given on the command line replaces the recipe's, so any recipe runs short with
`--run.max_steps=20`. A warm-up longer than the run allows is cut to fit, with a warning.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..config import ConfigError, ModelConfig, preset
from ..data import DataConfig
from ..errors import OrionError, unknown_names
from ..nn.lora import LoRAConfig
from .dpo import DPOConfig
from .optim import OptimConfig
from .quietstar import QuietStarConfig
from .schedule import ScheduleConfig

MODES = ("pretrain", "sft", "lora", "quietstar", "dpo")
# The recipes that ship with orionlm, as package data: `recipe:NAME` names one wherever a recipe file goes.
RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"
RECIPE_PREFIX = "recipe:"


class RecipeError(OrionError):
    """A recipe that cannot be used; the message names the key."""


@dataclass
class ModelSection:
    preset: str | None = None  # a preset name (`orionlm info --preset list`)
    overrides: dict[str, Any] = field(default_factory=dict)  # ModelConfig fields changed on top of the preset
    config: dict[str, Any] | None = None  # a full ModelConfig instead of a preset
    # a trained model to start from (orionlm, Hugging Face or Auron directory, .gguf file, or Hub id; ID@REV for a
    # branch, tag or commit)
    path: str | None = None

    def build(self) -> ModelConfig:
        """The ModelConfig of a preset or config (a `path` model's config comes with its weights)."""
        if sum(x is not None for x in (self.preset, self.config, self.path)) != 1:
            raise RecipeError("model: give exactly one of `preset` (plus optional `overrides`), `config` or `path`")
        if self.path is not None:
            raise RecipeError("model.path: the model's config is read with its weights (load_model)")
        try:
            if self.preset is not None:
                return preset(self.preset, **self.overrides)
            return ModelConfig.from_dict({**self.config, **self.overrides})
        except (ConfigError, TypeError) as e:
            raise RecipeError(f"model: {e}") from None


@dataclass
class TokenizerSection:
    path: str | None = None  # a directory holding tokenizer.json
    train_vocab_size: int | None = None  # or: train a byte-level BPE of this size on the data sources
    train_max_bytes: int = 50_000_000  # text read from the sources to train it (spread over them by weight)


@dataclass
class RunConfig:
    out_dir: str = "runs/default"
    # The run's length: give one of max_steps, max_tokens and max_epochs (one on the command line replaces the
    # recipe's: `--run.max_steps=20` makes a short run of any recipe).
    max_steps: int | None = None
    max_tokens: int | None = None
    max_epochs: float | None = None  # passes over the training data (rows of every source)
    batch_size: int = 8  # sequences per device per micro-step
    grad_accum: int = 1  # micro-steps per optimizer step
    seed: int = 0
    log_every: int = 10
    eval_every: int = 100  # steps; 0 = only at the end
    eval_batches: int = 20
    save_every_steps: int = 0  # 0 = off
    save_every_tokens: int = 0  # 0 = off; checkpoint names say the tokens seen ("tokens-100M")
    keep_last: int = 3  # checkpoints kept (0 = all)
    resume: str | None = None  # "latest" or a checkpoint directory
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    compile: bool = False  # torch.compile the model
    activation_checkpointing: bool = False
    fsdp: bool = False  # under torchrun: shard parameters with FSDP2 instead of replicating them with DDP
    peak_flops: float | None = None  # for the MFU estimate; default: a matmul measured at start-up
    tensorboard: bool = True  # also log to TensorBoard when it is installed
    progress: bool = True  # the live progress bar
    plot: bool = True  # write the charts at the end (needs matplotlib)


@dataclass
class Recipe:
    model: ModelSection
    data: DataConfig
    mode: str = "pretrain"
    tokenizer: TokenizerSection = field(default_factory=TokenizerSection)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    run: RunConfig = field(default_factory=RunConfig)
    lora: LoRAConfig | None = None  # adapters under any mode but pretrain; mode lora without it: the defaults
    quietstar: QuietStarConfig | None = None  # mode quietstar only; absent: its defaults
    dpo: DPOConfig | None = None  # mode dpo only; absent: its defaults

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise RecipeError(f"mode: {unknown_names([self.mode], MODES)}; use one of {MODES}")
        if self.mode == "lora":
            self.lora = self.lora or LoRAConfig()
        if self.lora is not None:
            self._check_adapters(self.lora)
        if self.quietstar is not None and self.mode != "quietstar":
            raise RecipeError(f"quietstar: the section is for mode: quietstar, not {self.mode}; remove it or set "
                              "mode: quietstar")  # fmt: skip
        if self.dpo is not None and self.mode != "dpo":
            raise RecipeError(f"dpo: the section is for mode: dpo, not {self.mode}; remove it or set mode: dpo")
        if self.mode == "dpo":
            if self.model.path is None:
                raise RecipeError("mode: dpo tunes a trained model: give model.path (a model directory or Hub id)")
            if self.data.format not in (None, "chat") or self.data.train_on_all:
                raise RecipeError("mode: dpo learns from the responses of preference pairs: set data.format=chat "
                                  "and data.train_on_all=false")  # fmt: skip
            if self.run.fsdp:
                raise RecipeError("mode: dpo trains with one process or DDP: set run.fsdp=false")
            self.dpo = self.dpo or DPOConfig()
        if self.mode == "quietstar":
            if self.data.format not in (None, "text"):
                raise RecipeError("mode: quietstar thinks at every position of text windows: set data.format=text")
            if self.run.fsdp:
                raise RecipeError("mode: quietstar trains with one process or DDP: set run.fsdp=false")
            self.quietstar = self.quietstar or QuietStarConfig()

    def _check_adapters(self, lora: LoRAConfig) -> None:
        """Adapters need a trained base to adapt, AdamW and whole parameters; Quiet-STaR trains its thinking head
        and meta embeddings fully beside them."""
        if self.mode == "pretrain":
            raise RecipeError("lora: adapters need a trained base, and pretraining starts from scratch: use mode: sft "
                              "with model.path, or drop the lora section")  # fmt: skip
        if self.model.path is None:
            raise RecipeError("lora: adapters need a trained base: give model.path (a model directory or Hub id)")
        if self.optim.name != "adamw":
            raise RecipeError("lora: adapters train low-rank factors with AdamW: set optim.name=adamw")
        if self.run.fsdp:
            raise RecipeError("lora: adapters train with one process or DDP: set run.fsdp=false")
        if self.mode == "quietstar" and "thinking" not in lora.modules_to_save:
            lora.modules_to_save = [*lora.modules_to_save, "thinking"]

    @property
    def adapters(self) -> LoRAConfig | None:
        """The LoRA adapters the run trains on its frozen base (None: it trains every parameter): the one switch
        the trainer reads, on whatever the mode."""
        return self.lora

    @property
    def data_format(self) -> str:
        """data.format, or its default: chat for fine-tuning, text for pretraining."""
        return self.data.format or ("text" if self.mode in ("pretrain", "quietstar") else "chat")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        """The recipe as YAML that load_recipe reads back to an equal Recipe, every default written out."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml())


class YAMLLoader(yaml.SafeLoader):
    """PyYAML's safe loader, reading 1e-3 as the number a user means: YAML 1.1 wants a dot in a float (1.0e-3)
    and would read it as a string; YAML 1.2 and every other tool read a float."""


YAMLLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"), list("-+.0123456789")
)


def read_yaml(text: str) -> Any:
    return yaml.load(text, Loader=YAMLLoader)


def build_dataclass(cls: Any, value: Any, where: str) -> Any:
    """value (parsed YAML) as an instance of the annotated type cls, checking keys and types."""
    origin = typing.get_origin(cls)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(cls)
        if value is None and type(None) in options:
            return None
        (cls,) = [t for t in options if t is not type(None)]
        origin = typing.get_origin(cls)
    if dataclasses.is_dataclass(cls):
        if not isinstance(value, dict):
            raise RecipeError(f"{where} must be a mapping, got {value!r}")
        hints = typing.get_type_hints(cls)
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in value if k not in known]
        if unknown:
            plural = "s" if len(unknown) > 1 else ""
            raise RecipeError(f"unknown key{plural} in {where}: {unknown_names(unknown, known)}")
        kwargs = {k: build_dataclass(hints[k], v, f"{where}.{k}") for k, v in value.items()}
        try:
            return cls(**kwargs)
        except TypeError as e:
            raise RecipeError(f"{where}: {e}") from None
        except OrionError as e:
            raise RecipeError(f"{where}: {e}") from None
    if origin is list:
        if not isinstance(value, list):
            raise RecipeError(f"{where} must be a list, got {value!r}")
        (item,) = typing.get_args(cls)
        return [build_dataclass(item, v, f"{where}.{i}") for i, v in enumerate(value)]
    if origin is tuple:
        items = typing.get_args(cls)
        if not isinstance(value, (list, tuple)) or len(value) != len(items):
            raise RecipeError(f"{where} must be a list of {len(items)} values, got {value!r}")
        return tuple(build_dataclass(t, v, f"{where}.{i}") for i, (t, v) in enumerate(zip(items, value, strict=True)))
    if origin is dict or cls is Any:
        return value
    if cls is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if cls in (int, float, str, bool) and not (isinstance(value, cls) and not (cls is int and isinstance(value, bool))):
        raise RecipeError(f"{where} must be {cls.__name__}, got {value!r}")
    return value


def apply_override(data: dict[str, Any], override: str) -> tuple[str, Any]:
    """Apply one `--section.key=value` (list items by index: `--data.sources.0.weight=2`); the value is
    parsed as YAML, so numbers, booleans, lists and null work. Returns the dotted key and the value."""
    text = override.removeprefix("--")
    if "=" not in text:
        raise RecipeError(f"override {override!r} must look like --section.key=value")
    dotted, raw = text.split("=", 1)
    keys = dotted.split(".")
    try:
        value = read_yaml(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    node: Any = data
    for key in keys[:-1]:
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise RecipeError(f"override {override!r}: {key!r} is not an index of a {len(node)}-item list")
            node = node[int(key)]
        else:
            node = node.setdefault(key, {})
    last = keys[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise RecipeError(f"override {override!r}: {last!r} is not an index of a {len(node)}-item list")
        node[int(last)] = value
    else:
        node[last] = value
    return dotted, value


# Settings of which a recipe gives one: the run's length, and the warm-up.
ALTERNATIVES = {"run": ("max_steps", "max_tokens", "max_epochs"), "schedule": ("warmup_steps", "warmup_fraction")}


def prefer_command_line(data: dict[str, Any], given: dict[str, Any]) -> None:
    """A setting given on the command line replaces the recipe's alternatives to it: `--run.max_steps=20` on a
    recipe with max_epochs runs 20 steps, `--schedule.warmup_fraction=0.1` on one with warmup_steps warms up over
    10% of the run."""
    for section, keys in ALTERNATIVES.items():
        chosen = [key for key in keys if given.get(f"{section}.{key}") is not None]
        if chosen and isinstance(data.get(section), dict):
            data[section].update({key: None for key in keys if key not in chosen})


def expand_overrides(words: list[str] | tuple[str, ...]) -> list[str]:
    """Command-line words as `section.key=value` overrides: `--a.b=c`, `--a.b c` and `a.b=c`, plus
    `--resume` (the latest checkpoint of run.out_dir) and `--resume DIR`."""
    words, out = list(words), []
    while words:
        word = words.pop(0)
        if not word.startswith("--"):
            if "=" not in word:
                raise RecipeError(f"unexpected argument {word!r}; recipe changes look like --section.key=value")
            out.append(word)
            continue
        key, sep, value = word[2:].partition("=")
        if not sep:
            takes_value = bool(words) and not words[0].startswith("--")
            if key == "resume":
                value = words.pop(0) if takes_value else "latest"
            elif takes_value:
                value = words.pop(0)
            else:
                raise RecipeError(f"{word} needs a value: {word}=VALUE")
        out.append(f"{'run.resume' if key == 'resume' else key}={value}")
    return out


def shipped_recipes() -> dict[str, Path]:
    """The recipes that ship with orionlm, by name (the file's name without .yaml)."""
    return {path.stem: path for path in sorted(RECIPES_DIR.glob("*.yaml"))}


def recipe_file(path: str | Path) -> Path:
    """The file of a recipe: `recipe:NAME` is the recipe NAME that ships with orionlm, anything else a path."""
    if not str(path).startswith(RECIPE_PREFIX):
        return Path(path)
    name, recipes = str(path).removeprefix(RECIPE_PREFIX).removesuffix(".yaml"), shipped_recipes()
    if name not in recipes:
        raise RecipeError(f"no recipe {unknown_names([name], recipes)} ships with orionlm; the recipes: "
                          f"{', '.join(recipes)} (orionlm recipes describes them)")  # fmt: skip
    return recipes[name]


def recipe_summary(path: Path) -> str:
    """A recipe's one-line description: the first line of its leading comment."""
    first = path.read_text().partition("\n")[0]
    return first.removeprefix("#").strip() if first.startswith("#") else ""


def read_yaml_mapping(path: str | Path, what: str, holds: str) -> dict[str, Any]:
    """The mapping at the top of a YAML file (or of a shipped recipe, `recipe:NAME`); a missing file, invalid YAML
    or anything but a mapping is a RecipeError naming the file (`what` it is, and what its mapping `holds`)."""
    path = recipe_file(path)
    if not path.is_file():
        shipped = f"; orionlm ships one as recipe:{path.stem}" if path.stem in shipped_recipes() else ""
        raise RecipeError(f"{what} {path} does not exist{shipped}")
    try:
        data = read_yaml(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise RecipeError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path} must hold a mapping of {holds}")
    return data


def load_recipe(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a recipe YAML file (a path or `recipe:NAME`, or start from nothing), apply the overrides (command-line
    words, see expand_overrides), validate everything."""
    data = read_yaml_mapping(path, "recipe", "sections (model, data, optim, ...)") if path is not None else {}
    given = dict(apply_override(data, override) for override in expand_overrides(overrides))
    prefer_command_line(data, given)
    for section in ("model", "data"):
        if section not in data:
            raise RecipeError(f"the recipe needs a `{section}` section")
    recipe = build_dataclass(Recipe, data, "recipe")
    if recipe.model.path is None:
        recipe.model.build()  # validate the model now, not after the data is tokenized
    return recipe


def check_context(recipe: Recipe, max_seq_len: int, resuming: bool) -> None:
    """data.seq_len within the model's context: longer windows would train positions that generation then refuses
    (it stops at max_seq_len), and the saved config would not say the model had seen them."""
    seq_len = recipe.data.seq_len
    if seq_len <= max_seq_len:
        return
    if resuming:
        whose, how = "the resumed checkpoint's", " (a resumed run keeps its model's context)"
    elif recipe.model.path is not None:
        whose, how = f"{recipe.model.path}'s", ", or start from a model with a longer max_seq_len"
    else:
        whose, how = "the model's", f", or lengthen the context with --model.overrides.max_seq_len={seq_len}"
    raise RecipeError(f"data.seq_len ({seq_len}) is longer than {whose} context (max_seq_len {max_seq_len}): lower "
                      f"data.seq_len to {max_seq_len}{how}")  # fmt: skip


def chat_packing(recipe: Recipe, config: ModelConfig) -> bool | None:
    """Whether chat rows are packed several to a row (None: the data is text windows)."""
    if recipe.data_format != "chat":
        return None
    if recipe.data.packing is None:
        return config.architecture != "chimera"
    if recipe.data.packing and config.architecture == "chimera":
        raise RecipeError("data.packing: GDN layers carry state across packed conversations; set it to false")
    return recipe.data.packing
