"""Command line: `memex <stage> key=value ...`, with the same Hydra overrides as `python jobs/<stage>.py`.

This is where Hydra stops: the composed config is turned into the typed dataclasses of
`memex.config` (which also validates types and enum choices) and handed to the stage's `run`.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import functools
import itertools
import logging
import os
import re
import shlex
import sys
import typing
from typing import Any

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from memex import config as C
from memex.redact import install_log_redaction, redact, redact_override, redact_text
from memex.storage import Store

CONF_DIR = C.CONF_DIR

# ${memex_home:} in YAML: the checkout holding conf/ (where the demo model and data live).
OmegaConf.register_new_resolver("memex_home", lambda: C.MEMEX_HOME, replace=True)

# Schema: every group's YAML is merged onto its dataclass field, so unknown keys and bad types fail.
_cs = ConfigStore.instance()
_cs.store(name="generate_schema", node=C.GenerateConfig)
_cs.store(name="train_schema", node=C.TrainConfig)
_cs.store(name="audit_schema", node=C.AuditConfig)
_cs.store(name="nightly_schema", node=C.NightlyAuditConfig)
_cs.store(name="mia_schema", node=C.MiaConfig)


# ---- keys outside the schema -------------------------------------------------------------------
# Hydra's struct mode refuses `sampling.typo=1`, but `+sampling.typo=1` and `++sampling.typo=1` open
# the node and add the key, and OmegaConf.to_object then sets it as a stray attribute of the
# dataclass: the audit ran with the default. So every key of the composed config is checked against
# the dataclasses here (whatever its prefix or origin), except below Dict-typed fields
# (storage.options, data.storage_options: fsspec options, free-form by design).
def _fields(cls: type) -> dict[str, Any]:
    """A config dataclass's field name -> resolved type (the module uses postponed annotations)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unwrap(tp: Any) -> Any:
    """Optional[X] -> X."""
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp


def _list_item(tp: Any) -> Any:
    """List[X] -> X, else None."""
    tp = _unwrap(tp)
    return typing.get_args(tp)[0] if typing.get_origin(tp) in (list, typing.List) and typing.get_args(tp) else None


def _free_form(tp: Any) -> bool:
    """A Dict (or Any) field: any key below it is the user's (fsspec options)."""
    tp = _unwrap(tp)
    return tp is Any or typing.get_origin(tp) in (dict, typing.Dict)


def valid_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key of a config dataclass: `sampling`, `sampling.samples_per_prompt`, ..."""
    out = []
    for name, tp in _fields(cls).items():
        out.append(prefix + name)
        if dataclasses.is_dataclass(_unwrap(tp)):
            out += valid_keys(_unwrap(tp), f"{prefix}{name}.")
    return out


def unknown_key_message(key: str, candidates: list[str]) -> str:
    """"<key> is not a setting; did you mean <nearest>?" (difflib over the schema's dotted keys)."""
    near = difflib.get_close_matches(key, candidates, n=1)
    if near:
        return f"{key} is not a setting; did you mean {near[0]}?"
    top = sorted({c.split(".")[0] for c in candidates})
    return f"{key} is not a setting (the settings are under {', '.join(top)}; --cfg job prints them all)"


def check_key(key: str, cls: type) -> str | None:
    """None when the dotted `key` is in the schema `cls` (or below a free-form Dict field), else the
    message naming it and the nearest valid key."""
    node, path = cls, []
    for part in key.split("."):
        fields = _fields(node) if dataclasses.is_dataclass(node) else {}
        if part not in fields:
            prefix = ".".join(path)
            candidates = valid_keys(node, prefix + ".") if path and dataclasses.is_dataclass(node) else []
            return unknown_key_message(key, candidates or valid_keys(cls))
        path.append(part)
        tp = fields[part]
        if _free_form(tp) or _list_item(tp) is not None:
            return None  # fsspec options; a list's items are typed by OmegaConf itself
        node = _unwrap(tp)
    return None


def _leaf(node: Any, key: str) -> str:
    """The first dotted leaf under an unknown key (`sampeling` -> `sampeling.samples_per_prompt`)."""
    while isinstance(node, DictConfig) and not node._is_missing() and not node._is_none() and len(node):
        k = next(iter(node.keys()))
        key, node = f"{key}.{k}", node._get_node(k)
    return key


def extra_keys(node: DictConfig, cls: type, prefix: str = "") -> list[tuple[str, list[str]]]:
    """(key, candidates) for every key of the composed `node` that its dataclass `cls` lacks."""
    fields, out = _fields(cls), []
    for k in node.keys():
        key, child = f"{prefix}{k}", node._get_node(k)
        if k not in fields:
            out.append((_leaf(child, key), valid_keys(cls, prefix) if prefix else []))
            continue
        tp = _unwrap(fields[k])
        if child._is_missing() or child._is_none():
            continue
        if dataclasses.is_dataclass(tp) and isinstance(child, DictConfig):
            out += extra_keys(child, tp, key + ".")
        elif dataclasses.is_dataclass(_list_item(tp)) and isinstance(child, ListConfig):
            for i, item in enumerate(child):
                if isinstance(item, DictConfig):
                    out += extra_keys(item, _list_item(tp), f"{key}[{i}].")
    return out


def check_schema(cfg: DictConfig, cls: type) -> None:
    """Refuse keys the dataclasses lack, however they got in (`+key=`, `++key=`, a YAML option)."""
    bad = extra_keys(cfg, cls)
    if bad:
        key, candidates = bad[0]
        raise C.ConfigError(unknown_key_message(key, candidates or valid_keys(cls)))


def hydra_quoted(value: str) -> str:
    """`value` as one Hydra override value that parses back to exactly it: single-quoted, its quotes and `${`
    escaped, and the backslashes that precede a quote or end it doubled (Hydra reads the others as they are).
    Unquoted, a path with `=`, `,`, brackets, parentheses, `#`, spaces or non-ASCII letters (a sweep's
    .../lr=1e-4/checkpoint-500) was refused by the grammar, or split as a sweep."""
    out = re.sub(r"\\+(?='|$)", lambda m: m.group(0) * 2, value).replace("'", "\\'").replace("${", "\\${")
    return f"'{out}'"


def check_overrides(args: list[str], cls: type) -> None:
    """The command line's `key=value`, `+key=value` and `++key=value` overrides against the schema,
    before Hydra composes: Hydra's own message for an unknown key advises `+key=...`, which would
    then be accepted silently. Values too, in one line each: an enum value outside its choices, a
    group option with no YAML file, a scalar of the wrong type. hydra.* is Hydra's to check."""
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    overrides = []
    parsed = get_args_parser().parse_known_args(args)[0]
    modes = [m for m in ("run", "multirun", "cfg", "info", "shell_completion") if getattr(parsed, m, None)]
    if len(modes) > 1:  # Hydra's ValueError, as a traceback
        raise C.ConfigError(f"{' and '.join('--' + m.replace('_', '-') for m in modes)} cannot be combined: give one")
    if getattr(parsed, "resolve", False) and not parsed.cfg and not parsed.help:  # Hydra's ValueError: a traceback
        raise C.ConfigError("--resolve goes with --cfg job: it resolves the printed config (memex <stage> ... "
                            "--cfg job --resolve); drop --resolve to run")
    for text in parsed.overrides:
        try:
            overrides.append(parser.parse_override(text))
        except Exception as e:  # noqa: BLE001 - Hydra's grammar error: named with the override and the fix
            raise C.ConfigError(unparsable_override_message(text, e)) from e
        if overrides[-1].is_sweep_override() and not parsed.multirun:  # Hydra's answer: six lines, no key
            key, _, value = text.partition("=")
            shown = redact_override(text)  # a credential's or a webhook's value is not repeated (memex/redact.py)
            value = value if shown == text else "..."
            raise C.ConfigError(f"{shown} is a sweep (one run per value): add --multirun (-m) to run them all; a "
                                f"list is {key}=[{value}], a string with commas is quoted: {key}='{value}'")
    stage = next((s for s, c in SCHEMAS.items() if c is cls), None)
    for o in overrides:
        key = o.key_or_group
        if o.is_delete() or o.package is not None or key.split(".")[0].split("/")[0] == "hydra":
            continue
        if (CONF_DIR / key).is_dir():
            msg = _check_group(stage, key, o) or next(filter(None, (_check_option(key, v) for v in _values(o))), None)
        else:  # each value of a -m sweep too: Hydra's error came after it had written multirun/<date>/<time>/
            msg = check_key(key, cls) or next(filter(None, (_check_value(key, v, cls) for v in _values(o))), None)
        # a mapping's keys too (storage={secret: ...}): Hydra's "To append to your config use +<the override>"
        # repeated its value on stderr
        msg = msg or next(filter(None, (check_key(k, cls) for k in _mapping_keys(key, _values(o)))), None)
        if msg:
            raise C.ConfigError(msg)
    if msg := _kind_without_its_option(overrides, cls) or _absent_free_form_key(overrides, cls):
        raise C.ConfigError(msg)


def _below_free_form(key: str, cls: type) -> bool:
    """Is the dotted `key` strictly below a Dict field of `cls` (storage.options.secret, data.storage_options.x)?"""
    node, parts = cls, key.split(".")
    for i, part in enumerate(parts):
        fields = _fields(node) if dataclasses.is_dataclass(node) else {}
        if part not in fields:
            return False
        if _free_form(fields[part]):
            return i < len(parts) - 1
        node = _unwrap(fields[part])
    return False


def _mapping_keys(key: str, values: list[Any]) -> list[str]:
    """The dotted keys a mapping value sets, down to its last mapping (`storage={options: {secret: x}}` ->
    storage.options.secret; an empty one, the key itself), for each mapping among `values` (one, or a -m sweep's)."""
    def flat(prefix: str, value: Any) -> list[str]:
        if not isinstance(value, dict) or not value:
            return [prefix]
        return [k for name, v in value.items() for k in flat(f"{prefix}.{name}", v)]

    return [k for v in values if isinstance(v, dict) for k in flat(key, v)]


def _free_form_override(override: Any, cls: type) -> bool:
    """Does the override set a key below a Dict field of `cls`: dotted (storage.options.secret=x), or with a mapping
    given to the field or one above it (storage.options={secret: x}, storage={options: {secret: x}})?"""
    return any(_below_free_form(k, cls) for k in [override.key_or_group, *_mapping_keys(override.key_or_group,
                                                                                         _values(override))])


def _has_key(cfg: DictConfig, key: str) -> bool:
    """Does the composed `cfg` hold the dotted `key` (a value, null or ??? included)? Nothing is resolved."""
    node = cfg
    for part in key.split("."):
        if not isinstance(node, DictConfig) or node._is_missing() or node._is_none() or part not in node.keys():
            return False
        node = node._get_node(part)
    return True


def _absent_merged_key(cfg: DictConfig, key: str, value: dict) -> str | None:
    """The first dotted key that merging the mapping `value` into `cfg`'s `key` adds, which Hydra refuses for a
    plain override (struct mode). Below a null or a scalar there is none: the merge replaces it whole."""
    node = cfg
    for part in key.split("."):
        node = node._get_node(part)
    if not isinstance(node, DictConfig) or node._is_missing() or node._is_none():
        return None
    for name, v in value.items():
        sub = f"{key}.{name}"
        if not _has_key(cfg, sub):
            return sub
        if isinstance(v, dict) and (missing := _absent_merged_key(cfg, sub, v)):
            return missing
    return None


def _absent_free_form_key(overrides: list, cls: type) -> str | None:
    """A plain `key=value` (no +) below a Dict field, for a key the composed config lacks (none of the shipped
    storage options sets storage.options.secret): Hydra refused it with "To append to your config use
    +storage.options.secret=<the value>", printed to stderr by Hydra itself, unredacted (and kept in a Ray
    job's log). Refused here, naming +key=... without the value. A mapping given to a Dict field or one above
    it (storage.options={key: ..., secret: ...}, storage={options: {...}}, data.storage_options={token: ...})
    is refused the same way when it sets such a key; one whose keys the config has is merged by Hydra as it is.
    The config is composed with the command line's group options (each value of a -m sweep over one) and its
    +/++ overrides below Dict fields."""
    from hydra.core.override_parser.types import OverrideType

    plain = [o for o in overrides if o.type == OverrideType.CHANGE and o.package is None
             and _free_form_override(o, cls)]
    stage = next((s for s, c in SCHEMAS.items() if c is cls), None)
    if not plain or stage is None:
        return None
    fixed, sweeps = [], []
    for o in overrides:
        if o.package is not None or o.key_or_group.split("/")[0] == "hydra":
            continue
        # a group option (storage=s3); storage={...} sets values, and is checked below
        group = (CONF_DIR / o.key_or_group).is_dir() and not any(isinstance(v, dict) for v in _values(o))
        if group and o.is_sweep_override():
            sweeps.append([f"{o.key_or_group}={v}" for v in o.sweep_string_iterator()])
        elif group or (o.type != OverrideType.CHANGE and not o.is_sweep_override() and _free_form_override(o, cls)):
            fixed.append(o.input_line)
    for combo in list(itertools.product(*sweeps))[:16]:
        try:
            cfg = compose_config(stage, [*fixed, *combo])
        except Exception:  # noqa: BLE001 - another problem of the command line: Hydra's to report
            return None
        where = f" with {' '.join(combo)}" if combo else ""
        for o in plain:
            key = o.key_or_group
            if _below_free_form(key, cls) and not _has_key(cfg, key):
                return (f"{key} is not in the config{where}, so there is nothing to override: put a + before it "
                        f"to add it (+{key}=...; the value is not repeated here)")
            for value in (v for v in _values(o) if isinstance(v, dict)):
                if missing := _has_key(cfg, key) and _absent_merged_key(cfg, key, value):
                    return (f"{missing} is not in the config{where}, so {key}={{...}} has nothing to override there: "
                            f"put a + before it to add it (+{key}={{...}}; the value is not repeated here)")
    return None


# The key of a config group that picks its kind. An option of the group (conf/<group>/<option>.yaml) that sets
# it may set other values of that kind with it: the key set alone kept the other values of the option in force
# (`memex audit triage.kind=preview`: triage=auto's 4 seeds x 1 step, where triage=preview takes 8 x 10;
# `prompts.source=captions`: generate's unlimited prompts or the audit's 24, where prompts=captions takes 1000).
KIND_KEYS = {"embedder": "kind", "triage": "kind", "budget": "kind", "index": "kind", "match": "distance",
             "prompts": "source", "tracker": "kind", "arch": "kind"}
# values such an option sets that the kind key may go without: speed alone, or what validation asks for anyway
# (embedder=clip's path: unset, embedder.kind=clip is refused naming embedder.path)
INCIDENTAL = {"embedder": ("batch_size", "path")}


@functools.lru_cache(maxsize=None)
def kind_options(group: str) -> dict[str, tuple[str, dict]]:
    """A group's kind value -> (the option that sets it, the other values that option sets), for each option
    of conf/<group>/ that sets its KIND_KEYS key with values that depend on it."""
    key, out = KIND_KEYS[group], {}
    for option, raw in C.shipped_options(group).items():
        others = {k: v for k, v in raw.items() if k != key and k not in INCIDENTAL.get(group, ())}
        if key in raw and others:
            out.setdefault(str(raw[key]), (option, others))
    return out


def options_in_force(cls: type, given: dict) -> dict[str, str]:
    """group -> the option the stage's defaults list picks for it, after the preset the command line names, if
    any (its `override /group: option` entries); empty for a schema of no stage."""
    stage = next((s for s, c in SCHEMAS.items() if c is cls), None)
    if stage is None:
        return {}
    chosen = {group: option for group, option, _ in config_groups(stage) if isinstance(option, str)}
    preset = given.get("preset")
    if isinstance(preset, str) and preset in C.shipped_options("preset"):
        for entry in C.shipped_options("preset")[preset].get("defaults", []):
            for k, v in (entry.items() if isinstance(entry, dict) else ()):
                chosen[k.removeprefix("override").strip().lstrip("/")] = v
    return chosen


def _spelled(value: Any) -> str:
    """A YAML value as `key=value` spells it: [4, ${sampling.samples_per_prompt}], null, true."""
    if isinstance(value, list):
        return "[" + ", ".join(map(_spelled, value)) + "]"
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def _option_values(group: str, option: str) -> dict:
    """The values conf/<group>/<option>.yaml sets ({} for an option that adds nothing, or none of that name)."""
    return C.shipped_options(group).get(option, {})


def _kind_default(group: str, cls: type) -> str | None:
    """The schema's default of the group's KIND_KEYS key (triage.kind: auto): the kind of an option that does not
    set it (triage=auto, prompts=demo)."""
    node = _unwrap(_field_type(group, cls)) if group in _fields(cls) else None
    if not dataclasses.is_dataclass(node):
        return None
    default = next((f.default for f in dataclasses.fields(node) if f.name == KIND_KEYS[group]), None)
    return str(default.value if isinstance(default, enum.Enum) else default)


def _option_of_kind(group: str, value: str, cls: type) -> str | None:
    """The option of conf/<group>/ whose kind is `value`: the one that sets the fewest other values (prompts.source
    file: prompts=file, not prompts=demo, which sets a path), the one named after the kind first."""
    key, default = KIND_KEYS[group], _kind_default(group, cls)
    found = [(len(values), option != value, option) for option, values in C.shipped_options(group).items()
             if str(values.get(key, default)) == value]
    return min(found)[2] if found else None


def _preset_keys(given: dict) -> set[str]:
    """The dotted keys the body of the preset the command line names sets (preset=paper: prompts.limit), after the
    groups: no option's value there is kept by a kind key."""
    preset = given.get("preset")
    raw = C.shipped_options("preset").get(preset, {}) if isinstance(preset, str) else {}
    return {f"{g}.{k}" for g, body in raw.items() if g != "defaults" and isinstance(body, dict) for k in body}


def _kind_without_its_option(overrides: list, cls: type) -> str | None:
    """`<group>.<kind key>=<value>` without the group's option that sets that kind (KIND_KEYS): refused, naming the
    option, where that option sets other values too and neither they nor the option are on the command line, and
    the option is not the one in force already. embedder.kind=sscd (or clip) kept the pixels embedder's size, 32,
    and SSCD takes a 32 px input without a word (a ResNet pools it to one cell): an index of near-useless
    descriptors, and matches, triage previews and near-duplicate ranking that find almost nothing.
    Refused too where the option in force (the command line's, else the defaults list's or the preset's) is of
    another kind and sets values beyond its kind that the command line does not: they were kept for the new kind
    (the audit's prompts.source=file: prompts=near_duplicates' limit of 24, the first 24 prompts of the file
    audited; match=relative's threshold 0.9 for match.distance=tiled_l2, where tiled l2 takes 0.15)."""
    given = {o.key_or_group: _value(o) for o in overrides if not o.is_delete()}
    in_force = None
    for group, key in KIND_KEYS.items():
        value = given.get(f"{group}.{key}")
        if not isinstance(value, str) or (group in given and not isinstance(given[group], str)):
            continue  # (a -m sweep over the group's options, or a mapping: Hydra's to compose)
        in_force = options_in_force(cls, given) if in_force is None else in_force
        old = given.get(group, in_force.get(group))
        if value in kind_options(group):
            option, others = kind_options(group)[value]
            missing = [k for k in others if f"{group}.{k}" not in given]
            if missing and old != option:
                return _kind_message(group, value, option, others, missing, old)
        if not isinstance(old, str) or group not in _fields(cls):
            continue
        old_values = _option_values(group, old)
        preset = _preset_keys(given)
        kept = {k: v for k, v in old_values.items() if k != key and k not in INCIDENTAL.get(group, ())
                and f"{group}.{k}" not in given and f"{group}.{k}" not in preset}
        if not kept or str(old_values.get(key, _kind_default(group, cls))) == value:
            continue
        option = _option_of_kind(group, value, cls)
        sets = ", ".join(f"{group}.{k}={_spelled(v)}" for k, v in kept.items())
        where = " on the command line" if group in given else ""
        fix = (f"choose the option {group}={option}{' in its place' if group in given else ''} (any {group}.* key "
               f"after it still wins)" if option else f"set {', '.join(f'{group}.{k}' for k in kept)} too")
        return (f"{group}.{key}={value} keeps {sets}, which the option in force{where}, {group}={old}, sets for "
                f"its own kind: {fix}")
    return None


def _kind_message(group: str, value: str, option: str, others: dict, missing: list[str], old: Any) -> str:
    """The refusal of a kind key whose own option sets values the command line does not."""
    key = KIND_KEYS[group]
    if group == "embedder":
        size = _option_values(group, old).get("size", 32) if isinstance(old, str) else 32
        return (f"embedder.kind={value} keeps the {old if isinstance(old, str) else 'pixels'} embedder's embedder.size "
                f"of {size} ({value} takes {others['size']} px): choose the option embedder={value}, which sets its "
                "size and batch, or set embedder.size")
    sets = ", ".join(f"{group}.{k}={_spelled(v)}" for k, v in others.items())
    keys = [f"{group}.{k}" for k in missing]
    keys = ", ".join(keys[:-1]) + " and " + keys[-1] if len(keys) > 1 else keys[0]
    return (f"{group}.{key}={value} keeps the other {group} settings of the option in force, and the option "
            f"{group}={option} also sets {sets}: choose the option {group}={option} (any {group}.* key after "
            f"it still wins), or set {keys} too")


def unparsable_override_message(text: str, error: Exception) -> str:
    """An override Hydra's grammar cannot read: a value holding `=` (a Hive-partitioned path,
    s3://b/set/date=2026-12-01/train.parquet), a space, brackets or parentheses, `#`, `;` or a
    non-ASCII letter. Hydra says only "mismatched input '=' expecting <EOF>", naming neither the
    override nor the fix; a quoted value takes any of them."""
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    key, eq, value = text.partition("=")
    if eq and redact_override(text) != text:  # a credential or a webhook: neither it nor the parser's quote of it
        return (f"cannot read the override {key}=... (its value is not repeated here: a credential): quote its value, "
                f"and the override for the shell: '{key}=\"...\"' (a \" inside it as \\\")")
    msg = f"cannot read the override {text}: {reason}"
    if not eq:  # `match.threshold 0.1`: the shell gave the key and its value as two arguments
        return f"{msg}; give the setting and its value as one argument, {text}=<value> (no space around =)"
    if value[:1] in ("'", '"') or ('"' in value and "'" in value):
        return f"{msg}; quote its value (https://hydra.cc/docs/advanced/override_grammar/basic/#quoted-values)"
    quote = "'" if '"' in value else '"'
    return f"{msg}; quote the value, and the override for the shell: {shlex.quote(f'{key}={quote}{value}{quote}')}"


_UNKNOWN = object()  # a sweep or an interpolation: Hydra's to resolve


def _value(override: Any) -> Any:
    """The override's value (None for `key=null`), or _UNKNOWN."""
    if override.is_sweep_override():
        return _UNKNOWN
    try:
        value = override.value()
    except Exception:  # noqa: BLE001
        return _UNKNOWN
    return _UNKNOWN if isinstance(value, str) and "${" in value else value


def _values(override: Any) -> list[Any]:
    """Each value the override gives: its one value, or each of a -m sweep's choices (a=x,y; choice(x,y);
    range(1,4)); _UNKNOWN for an interval() or a glob() sweep and an interpolation, Hydra's to resolve."""
    from hydra.core.override_parser.types import ValueType

    if not override.is_sweep_override():
        return [_value(override)]
    if override.value_type not in (ValueType.CHOICE_SWEEP, ValueType.SIMPLE_CHOICE_SWEEP, ValueType.RANGE_SWEEP):
        return [_UNKNOWN]
    try:  # (a range's values are all numbers of one kind: its first ones tell)
        values = list(itertools.islice(override.sweep_iterator(), 1000))
    except Exception:  # noqa: BLE001
        return [_UNKNOWN]
    return [_UNKNOWN if isinstance(v, str) and "${" in v else v for v in map(_unquoted, values)]


def _unquoted(value: Any) -> Any:
    """A sweep's element as its value: a quoted choice ('16') is Hydra's QuotedString until it is applied."""
    from hydra.core.override_parser.types import QuotedString

    if isinstance(value, QuotedString):
        return value.text
    if isinstance(value, list):
        return [_unquoted(v) for v in value]
    if isinstance(value, dict):
        return {k: _unquoted(v) for k, v in value.items()}
    return value


# a group of one stage given to another: train's data is the audit's trainset
GROUP_ALIASES = {"data": "trainset", "trainset": "data"}


@functools.lru_cache(maxsize=None)
def stage_groups(stage: str) -> tuple[str, ...]:
    """The config groups conf/<stage>.yaml's defaults list names (`optional tune: ...` included)."""
    import yaml

    out = []
    for entry in yaml.safe_load((CONF_DIR / f"{stage}.yaml").read_text()).get("defaults", []):
        for group in (entry if isinstance(entry, dict) else {}):
            group = group.removeprefix("optional").strip()
            if (CONF_DIR / group).is_dir():
                out.append(group)
    return tuple(out)


def _check_group(stage: str | None, group: str, override: Any) -> str | None:
    """A config group of another stage (memex audit given train's group data, memex generate given triage):
    Hydra advised adding it with a +, which then failed composing with a ConfigKeyError."""
    if stage is None or group in stage_groups(stage):
        return None
    groups = stage_groups(stage)
    near = GROUP_ALIASES.get(group) if GROUP_ALIASES.get(group) in groups else \
        next(iter(difflib.get_close_matches(group, groups, n=1)), None)
    return (f"{group} is not a config group of memex {stage}"
            + (f": did you mean {near}=...?" if near else "")
            + f" (its groups: {', '.join(groups)}; memex {stage} --help lists their options)")


def _check_option(group: str, value: Any) -> str | None:
    """A group option that does not exist (sampling=fats): one line, where Hydra's spans twelve
    (the config search path included)."""
    if not isinstance(value, str) or (CONF_DIR / group / f"{value}.yaml").exists():
        return None
    options = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
    return f"{group}={value} is not an option of {group}: use one of {', '.join(options)}"


def _field_type(key: str, cls: type) -> Any:
    node, tp = cls, None
    for part in key.split("."):
        if not dataclasses.is_dataclass(node):
            return None
        tp = _fields(node)[part]
        node = _unwrap(tp)
    return tp


# what OmegaConf itself accepts for a scalar field ("3" for an int, "1e-3" for a float, yes/no)
_SCALARS = {int: ("IntegerNode", "a whole number"), float: ("FloatNode", "a number"),
            bool: ("BooleanNode", "true or false")}


def _expects(tp: Any) -> str:
    """What a field of type `tp` takes, in words: "a whole number", "one of flat, ivfpq", "a list in brackets"."""
    tp = _unwrap(tp)
    if tp in _SCALARS:
        return _SCALARS[tp][1]
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return f"one of {', '.join(m.name for m in tp)}"
    if _list_item(tp) is not None:
        return "a list in brackets, [a,b]"
    if dataclasses.is_dataclass(tp):
        return f"its keys ({', '.join(_fields(tp))})"
    if _free_form(tp):
        return "a mapping in braces, {key: value}"
    return "a value"


def _check_value(key: str, value: Any, cls: type) -> str | None:
    """One value of an override of the schema's `key` (each value of a -m sweep in turn): null where the field
    is not Optional, a list where it takes one value, a list's items, an enum's choices, a scalar's type. Each was
    Hydra's six-line merge error ("field 'index.kind' is not Optional", "Cannot convert 'list' to string")."""
    tp = _field_type(key, cls)
    if tp is None or value is _UNKNOWN:
        return None
    if value is None:
        optional = tp is Any or type(None) in typing.get_args(tp)
        return None if optional else f"{key} cannot be null: give {_expects(tp)}"
    if isinstance(value, (list, dict)) and _list_item(tp) is None and not _free_form(tp) \
            and not dataclasses.is_dataclass(_unwrap(tp)):
        what, takes = "a list" if isinstance(value, list) else "a mapping", _expects(tp)
        takes = "" if takes == "a value" else f" ({takes})"
        return (f"{key}={_spelled(value)} is {what}, and {key} takes one value{takes}: give one, "
                f"and quote a value with commas or brackets, {key}='a,b'")
    return _check_list(key, value, cls) or _check_choice(key, value, cls) or _check_scalar(key, value, cls)


def _scalar_error(key: str, tp: Any, value: Any) -> str | None:
    """Why `value` is not a value of the scalar field type `tp` (int, float, bool), or None."""
    import omegaconf
    from omegaconf.errors import ValidationError

    kind = _SCALARS.get(_unwrap(tp))
    if kind is None:
        return None
    if value is None:
        return None if _unwrap(tp) is not tp else f"{key} cannot be null: give {kind[1]}"
    if isinstance(value, (list, dict)):
        return f"{key}={_spelled(value)} is not {kind[1]}"
    try:
        getattr(omegaconf, kind[0])(value=value)
    except ValidationError:
        return f"{key}={_spelled(value)} is not {kind[1]}"
    return None


def _check_scalar(key: str, value: Any, cls: type) -> str | None:
    """A value of the wrong type (sampling.samples_per_prompt=abc, or 1.5): one line, where Hydra's
    merge error spans six."""
    tp = _field_type(key, cls)
    if value is _UNKNOWN or tp is None:
        return None
    return _scalar_error(key, tp, value)


def _check_list(key: str, value: Any, cls: type) -> str | None:
    """A single value for a list-typed key (budget.rounds=4, mia.attacks=loss): one line naming the
    bracket form, where Hydra's "Invalid value assigned: int is not a ListConfig" spans six. A list's items
    of the wrong type (budget.rounds=[4,abc]): named too."""
    tp = _field_type(key, cls)
    if tp is None or _list_item(tp) is None or value is _UNKNOWN or value is None:
        return None
    if isinstance(value, list):  # each item as its own scalar node takes it (an enum's: _check_choice)
        item_tp = _list_item(tp)
        for i, item in enumerate(value):
            if isinstance(item, str) and "${" in item:
                continue
            if item is None and _unwrap(item_tp) is item_tp:
                return f"{key}={_spelled(value)}: an item is null; each is {_expects(item_tp)}"
            if isinstance(item, (list, dict)) and not dataclasses.is_dataclass(_unwrap(item_tp)):
                return f"{key}={_spelled(value)}: the item {_spelled(item)} is not {_expects(item_tp)}"
            if isinstance(item, dict) and dataclasses.is_dataclass(_unwrap(item_tp)):
                if msg := _check_item(f"{key}[{i}]", item, _unwrap(item_tp)):
                    return msg
                continue
            if _scalar_error(key, item_tp, item):
                return f"{key}={_spelled(value)}: the item {_spelled(item)} is not {_SCALARS[_unwrap(item_tp)][1]}"
        return None
    item = _unwrap(_list_item(tp))
    if dataclasses.is_dataclass(item):  # data.duplication: a list of mappings
        return (f"{key}={value} is not a list: give a list of entries with keys {', '.join(_fields(item))}, "
                f"quoted for the shell, e.g. \"{key}=[{{{', '.join(f'{n}: ...' for n in list(_fields(item))[:2])}}}]\"")
    return f"{key}={value} is not a list: give it in brackets, {key}=[{value}] (or more items, comma-separated)"


def _check_item(key: str, item: dict, cls: type) -> str | None:
    """A mapping item of a list of config entries (data.duplication=[{copies: 32, cnt: 8}]): a key its dataclass
    lacks, named with the nearest one, and its values checked as the field's. Hydra's seven lines advised
    +data.duplication=..., which failed again ("Error merging override")."""
    fields = _fields(cls)
    for name, v in item.items():
        if name not in fields:
            near = difflib.get_close_matches(str(name), list(fields), n=1)
            return (f"{key}.{name} is not a setting; did you mean {key}.{near[0]}?" if near else
                    f"{key}.{name} is not a setting: an item of {key.rsplit('[', 1)[0]} takes {', '.join(fields)}")
        if v is not _UNKNOWN and not (isinstance(v, str) and "${" in v) and (
                msg := _check_value(name, v, cls)):
            return f"{key}.{msg}"
    return None


def _check_choice(key: str, value: Any, cls: type) -> str | None:
    """For an enum-typed key (or a list of them), a value that is none of its choices, named in one
    line; Hydra's own message spans five lines and ends on HYDRA_FULL_ERROR. A number or a boolean
    (index.kind=1) is none of them either."""
    from omegaconf import EnumNode
    from omegaconf.errors import ValidationError

    tp = _field_type(key, cls)
    if tp is None or value is _UNKNOWN:
        return None
    choice = _unwrap(_list_item(tp) or tp)
    if not (isinstance(choice, type) and issubclass(choice, enum.Enum)):
        return None
    names = [m.name for m in choice]

    def bad(v: Any) -> bool:
        if v is None:
            return False  # a null: the null check's (an Optional choice takes it)
        if isinstance(v, str):
            return "${" not in v and v not in names and v not in [str(m.value) for m in choice]
        try:
            EnumNode(enum_type=choice, value=v)
        except ValidationError:
            return True
        return False

    wrong = [v for v in (value if isinstance(value, list) else [value]) if bad(v)]
    return f"{key}={_spelled(wrong[0])} is not a choice: use one of {', '.join(names)}" if wrong else None


def _typed(cfg: DictConfig, cls: type, validate):
    from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

    check_schema(cfg, cls)
    try:
        obj = OmegaConf.to_object(cfg)
    except MissingMandatoryValue as e:  # a ??? left in the config: name the key to set
        raise C.ConfigError(f"{e.full_key} is not set: add {e.full_key}=... to the command") from None
    except InterpolationResolutionError as e:  # storage=s3 without storage.root or $MEMEX_BUCKET, say
        raise C.ConfigError(f"{e.full_key} cannot be resolved ({str(e).splitlines()[0]}): add {e.full_key}=... to the "
                            "command, or set the environment variable it reads where the driver runs") from None
    assert isinstance(obj, cls), type(obj)
    validate(obj)
    return obj


def to_generate_config(cfg: DictConfig) -> C.GenerateConfig:
    return _typed(cfg, C.GenerateConfig, C.validate_generate)


def to_train_config(cfg: DictConfig) -> C.TrainConfig:
    return _typed(cfg, C.TrainConfig, C.validate_train)


def to_audit_config(cfg: DictConfig) -> C.AuditConfig:
    return _typed(cfg, C.AuditConfig, C.validate_audit)


def to_nightly_config(cfg: DictConfig) -> C.NightlyAuditConfig:
    if OmegaConf.is_missing(cfg.model, "path"):  # model=local's ???: nightly replaces it per checkpoint
        cfg = cfg.copy()
        with open_dict(cfg):
            cfg.model.path = ""  # (unset: each checkpoint brings its own)
    return _typed(cfg, C.NightlyAuditConfig, C.validate_nightly)


def to_mia_config(cfg: DictConfig) -> C.MiaConfig:
    return _typed(cfg, C.MiaConfig, C.validate_mia)


# what a rerun of the same command after Ctrl-C keeps (units and checkpoints are written atomically)
RESUMES = {"generate": "the shards already written are kept; rerun the same command to resume",
           "audit": "the units already written are kept; rerun the same command to resume",
           "mia": "the units already written are kept; rerun the same command to resume",
           "nightly": "checkpoints audited are in the ledger; rerun the same command to audit the rest",
           "train": "rerun the same command to resume from the last checkpoint (trainer.checkpoint_every)"}


def _report_errors(fn):
    """Known user errors print one line naming the fix and exit 1 (Hydra would print a traceback).

    Around the stage, the console and the log file (memex/console.py): the stage returns the folder
    its log goes to (the run folder), or None; a failed stage's log goes to the folder it last
    worked in. Its location is printed last, unless the command failed before any work."""

    def wrapper(cfg: DictConfig) -> None:
        from memex import console

        try:
            console.setup(fn.__name__.lstrip("_"))
        except console.LogDirError as e:
            print(f"memex: error: {redact_text(str(e))}", file=sys.stderr)
            raise SystemExit(1) from None
        dest, ok, failed = None, False, False
        try:
            dest = fn(cfg)
            ok = True
        except C.MemexError as e:
            message = redact_text(str(e))  # no credential: memex/redact.py
            _to_log_file(f"{type(e).__name__}: {message}")  # why the command failed, in <run>/logs/ too
            print(f"memex: error: {message}", file=sys.stderr)
            failed = True
        except KeyboardInterrupt:  # Ctrl-C: a page of Ray Data's frames said nothing a user needs
            print(f"memex: interrupted: {RESUMES[fn.__name__.lstrip('_')]}", file=sys.stderr)
            raise SystemExit(130) from None  # 128 + SIGINT, as a shell reports it (a sweep stops too)
        except Exception as e:  # noqa: BLE001 - a bug, or a library's error memex does not know: its traceback,
            # redacted (Hydra printed "Error executing job with overrides: [...]" with the raw command line, a
            # webhook's or a URL's credentials included), and into the run's log file too
            import traceback

            logging.getLogger("memex").error("%s: %s", type(e).__name__, e, exc_info=True)  # (redacted: redact.py)
            print(redact_text("".join(traceback.format_exception(e))), file=sys.stderr, end="")
            failed = True
        finally:
            worked = ok or console.noted_folder() is not None
            where = console.finish(dest if ok else None, keep=worked)
            if worked and where:
                print(redact_text(f"memex: log: {where}"), file=sys.stderr)
        if failed and (job := _sweep_job()) is not None:  # a -m sweep goes on to its next job: SystemExit ended
            SWEEP_FAILURES.append(job)  # the whole sweep at the first refused value; main() exits 1 at its end
        elif failed:
            raise SystemExit(1)

    wrapper.__name__, wrapper.__doc__ = fn.__name__, fn.__doc__
    return wrapper


def _to_log_file(message: str) -> None:
    """An error line for this command's log file(s) only: the console gets it from the caller's print (memex's
    ERROR records are shown on the console too, memex/console.py, and it would read twice)."""
    log = logging.getLogger("memex.cli")
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, "%s", (message,), None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler) and record.levelno >= handler.level:
            handler.handle(record)


SWEEP_FAILURES: list[str] = []  # the failed jobs of this process's -m sweep ("#<n> <overrides>", redacted)


def _sweep_job() -> str | None:
    """This job's number and overrides when it is one of a `-m` sweep's jobs, else None."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        if hc.mode != RunMode.MULTIRUN:
            return None
        return f"#{hc.job.num} {' '.join(map(redact_override, hc.overrides.task))}"  # each: `key=a b` is one value
    except Exception:  # noqa: BLE001 - not under Hydra's run (a test calling the stage): no sweep
        return None


@_report_errors
def _generate(cfg: DictConfig) -> Store | None:
    from memex.stages import generate

    gcfg = to_generate_config(cfg)
    summary = generate.run(gcfg, generate.prepare(gcfg), fixed=True)  # an audit's rounds are refused, not resumed
    print(redact_text(f"memex generate: {summary['rows']} samples in {summary['shards']} shards "
                      f"({summary['generated_shards']} generated now) -> {summary['run']}"))
    return Store(summary["run"], gcfg.storage.options)  # the log goes to <run>/logs/


generate_main = hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="generate")(_generate)



@_report_errors
def _train(cfg: DictConfig) -> Store | None:
    from memex.training import train

    out = train(to_train_config(cfg))
    print(redact_text(f"memex train: model saved to {out}"))
    return Store(str(out))


train_main = hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="train")(_train)


@_report_errors
def _audit(cfg: DictConfig) -> Store | None:
    from memex.stages import audit

    acfg = to_audit_config(cfg)
    summary = audit.run(acfg)
    print(redact_text(audit.format_summary(summary)))
    return Store(summary["run"], acfg.storage.options)


audit_main = hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="audit")(_audit)


@_report_errors
def _mia(cfg: DictConfig) -> Store | None:
    from memex.stages import mia

    mcfg = to_mia_config(cfg)
    summary = mia.run(mcfg)
    print(redact_text(mia.format_summary(summary)))
    return Store(summary["run"], mcfg.storage.options)  # the log goes to <run>/logs/


mia_main = hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="mia")(_mia)


GATE_EXIT = 3  # nightly: a checkpoint crossed the budget or the growth margin (1: errors, 2: usage)


def _logs_to_stderr() -> None:
    """Hydra's job_logging writes to stdout; move it to stderr where stdout is a machine-read result."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stdout:
            handler.setStream(sys.stderr)


@_report_errors
def _nightly(cfg: DictConfig) -> Store | None:
    from memex.stages import nightly

    if cfg.nightly.action == C.NightlyAction.plan.value:
        _logs_to_stderr()  # stdout is read by `... | while read -r id ckpt`: only those lines, no log line (faiss')
    ncfg = to_nightly_config(cfg)
    res = nightly.run(ncfg)
    if ncfg.nightly.action == C.NightlyAction.plan:
        for p in res.pending:  # "<submission id> <checkpoint folder>", one per line, for a shell loop
            # redacted: nightly.only matches a redacted location too (memex/stages/nightly.py); quoted for
            # Hydra, since the loop passes it on as nightly.only="$ckpt" (hydra_quoted)
            print(p.submission_id(res.config_sha256, nightly.night_of(ncfg)),
                  hydra_quoted(redact_text(p.ckpt.location)))
        if res.alarms:  # rows a killed job wrote and never announced: the shell loop's lines are all out first
            sys.stdout.flush()
            _alarm_exit(ncfg, res, [])
        return None
    from memex import console

    console.note_folder(Store(nightly.ledger_root(ncfg), ncfg.storage.options))  # the log: <ledger>/logs/
    print(nightly.format_result(res))
    # The alarm wins the exit code over failed audits and a failed webhook: its row is final (the
    # checkpoint is not audited again), so a night with both exited 1 without the ALARM line, a CI that
    # pages on 3 and retries 1 never paged, and the next night exited 0. Failed audits are retried then.
    problems = []
    try:
        nightly.announce(ncfg, res)
    except C.MemexError as e:
        problems.append(str(e))
    if res.errors:
        problems.insert(0, f"{len(res.errors)} audits failed: " + "; ".join(
            f"{r['location']}: {r['message']}" for r in res.errors) + " (they are retried on the next run)")
    if res.alarms:
        _alarm_exit(ncfg, res, problems)
    if problems:
        raise C.MemexError("; ".join(problems))
    return None


def _alarm_exit(ncfg, res, problems: list[str]) -> None:
    """The night's errors, its ALARM line, the alarms marked announced, exit GATE_EXIT."""
    from memex.stages import nightly

    if ncfg.nightly.action == C.NightlyAction.plan:  # (a run's webhook was called before, with its result)
        try:
            nightly.announce(ncfg, res)
        except C.MemexError as e:
            problems.append(str(e))
    for p in problems:
        print(redact_text(f"memex: error: {p}"), file=sys.stderr)
    print(redact_text("memex nightly: ALARM: " + "; ".join(f"{r['location']}: {r['message']}" for r in res.alarms)),
          file=sys.stderr)
    try:  # (a night that ends before this line: the next one announces them)
        nightly.mark_announced(ncfg, res)
    except Exception as e:  # noqa: BLE001 - the alarm's exit code must stand; said, not swallowed
        print(redact_text(f"memex: error: the alarms were not marked announced ({type(e).__name__}: {e}): the "
                          "next night announces them again"), file=sys.stderr)
    raise SystemExit(GATE_EXIT)


nightly_main = hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="nightly")(_nightly)


def report_main() -> None:
    """`memex report RUN`: rebuild RUN/report/index.html from the run folder alone (no Hydra config)."""
    import argparse
    import json

    from memex.layout import RunLayout
    from memex.report import build_report

    ap = argparse.ArgumentParser(prog="memex report", description=report_main.__doc__)
    ap.add_argument("run", help="run folder: a local path or fsspec URI (s3://bucket/runs/<name>)")
    ap.add_argument("--storage-options", default="{}",
                    help='fsspec options as JSON, e.g. \'{"endpoint_url": "http://minio:9000"}\'')
    a = ap.parse_args(sys.argv[1:])
    try:
        options = json.loads(a.storage_options)
        if not isinstance(options, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:  # JSONDecodeError too
        ap.error(redact_text(f"--storage-options must be a JSON object such as "
                             f"'{{\"endpoint_url\": \"http://minio:9000\"}}': {e}"))
    try:
        C.check_protocol("run", a.run)  # gs:// without gcsfs: one line, not fsspec's ImportError
        layout = RunLayout.at(a.run, options)
        # an unreachable endpoint or refused credentials: one line, not botocore's 136-line traceback
        layout.store.check_reachable("run folder", "the URI and --storage-options (endpoint_url, credentials)")
        print(redact_text(f"memex report: {build_report(layout)}"))
    except C.MemexError as e:
        print(f"memex: error: {redact_text(str(e))}", file=sys.stderr)
        raise SystemExit(1) from None
    except Exception as e:  # noqa: BLE001 - a bug or a library's error: its traceback, redacted, as the stages print it
        import traceback

        print(redact_text("".join(traceback.format_exception(e))), file=sys.stderr, end="")
        raise SystemExit(1) from None


STAGES = {"audit": audit_main, "generate": generate_main, "mia": mia_main, "nightly": nightly_main,
          "report": report_main, "train": train_main}


SCHEMAS = {"audit": C.AuditConfig, "generate": C.GenerateConfig, "mia": C.MiaConfig,
           "nightly": C.NightlyAuditConfig, "train": C.TrainConfig}
VERBOSE_FLAGS = ("-v", "--verbose")
HELP_FLAGS = ("-h", "--help")

# ---- help, before Hydra (whose --help would call the command "cli" and print its own template) ----
# One line per stage for `memex --help`; a few lines for `memex <stage> --help`.
SUMMARIES = {
    "audit": "index the training set, generate, filter and match: which training images the model reproduces",
    "generate": "sample every prompt N times and write the samples as Parquet shards in a run folder",
    "mia": "membership inference: how well loss, PIA, SecMI and LiRA tell training images from held-out ones",
    "nightly": "audit every new checkpoint of a training run, gate on memorization, rebuild the trend page",
    "report": "rebuild <run>/report/index.html from a run folder alone",
    "train": "train a small diffusion model on a manifest, with a duplication schedule",
}
DESCRIPTIONS = {
    "audit": "Indexes the training set (embeddings + near-duplicates), picks prompts, generates samples on Ray,\n"
             "finds cliques of near-identical generations, and matches every generation against the index (only\n"
             "the cliques' with preset=paper). Writes one run folder under storage.root: summary.json and\n"
             "report/index.html. With no overrides: the shipped demo.",
    "generate": "Samples every prompt sampling.samples_per_prompt times with the model, on a Ray actor pool,\n"
                "and writes the samples as Parquet shards to <storage.root>/<run>/samples/. A rerun resumes.",
    "mia": "Scores every image of members.path (trained on) and nonmembers.path (held out, same distribution)\n"
           "with each attack of mia.attacks on a Ray actor pool (LiRA: mia.shadow_models shadow models trained\n"
           "like the target, one Ray task each), then writes AUC, TPR at 1% and 0.1% FPR and balanced accuracy\n"
           "to <run>/mia/summary.json and the ROC curves to <run>/report/mia.html. With no overrides: the demo.",
    "nightly": "Lists the checkpoints under nightly.location, audits each one the ledger has not seen with this\n"
               "config, gates on the budget and the growth over the previous step, and rebuilds the trend page.\n"
               "Exits 3 when a checkpoint crossed the gate.",
    "train": "Trains a small diffusion model (arch) on a manifest (data), duplicating chosen images per\n"
             "data.duplication, and writes a diffusers folder to `output` with training_manifest.parquet.",
}
# The keys most users change, per stage; their defaults are read from the composed config.
COMMON_KEYS = {
    "generate": ["model.path", "model.kind", "sampling.samples_per_prompt", "sampling.num_inference_steps",
                 "sampling.guidance_scale", "prompts.source", "prompts.path", "storage.root",
                 "resources.num_gpus", "resources.max_actors", "run.name"],
    "audit": ["model.path", "trainset.path", "sampling.samples_per_prompt", "prompts.limit", "filter.min_clique",
              "match.threshold", "index.shards", "storage.root", "storage.shared_mount", "resources.num_gpus",
              "resources.max_actors", "run.name"],
    "mia": ["model.path", "members.path", "nonmembers.path", "mia.attacks", "mia.shadow_models", "mia.shadow_steps",
            "mia.batch_size", "storage.root", "resources.num_gpus", "run.name"],
    "nightly": ["nightly.location", "nightly.base_model", "nightly.budget", "nightly.webhook", "nightly.action",
                "trainset.path", "storage.root", "resources.num_gpus"],
    "train": ["output", "data.path", "trainer.steps", "trainer.batch_size", "trainer.lr", "arch.kind",
              "arch.resolution"],
}


def stage_list() -> str:
    """`memex --help`: usage and the stages, one line each."""
    width = max(map(len, STAGES))
    lines = ["usage: memex [-v] <stage> [key=value ...]   (Hydra overrides; -v: everything on the console)",
             "       memex report RUN_FOLDER", "", "stages:"]
    lines += [f"  {name:<{width}}  {SUMMARIES[name]}" for name in STAGES]
    lines += ["", "memex <stage> --help: the stage's config groups and common keys"]
    return "\n".join(lines)


def config_groups(stage: str) -> list[tuple[str, str | None, list[str]]]:
    """(group, default option or None, every option) from conf/<stage>.yaml's defaults list and the
    conf/<group>/ folder, in the defaults list's order."""
    import yaml

    defaults = yaml.safe_load((CONF_DIR / f"{stage}.yaml").read_text()).get("defaults", [])
    out = []
    for entry in defaults:
        if not isinstance(entry, dict):
            continue
        for group, option in entry.items():
            if (CONF_DIR / group).is_dir():
                out.append((group, option, sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))))
    return out


def format_default(value: Any) -> str:
    """A composed value as `key=value` would spell it: null, true, 0.15, [4, 16]."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, ListConfig):  # items as they would be spelled: [loss, pia] (not enum reprs)
        return "[" + ", ".join(format_default(v) for v in OmegaConf.to_container(value, resolve=True)) + "]"
    if isinstance(value, DictConfig):
        return str(OmegaConf.to_container(value, resolve=True)).replace("'", "")
    return str(value)


def compose_config(stage: str, overrides: list[str], hydra: bool = False) -> DictConfig:
    """The stage's config as Hydra would compose it for these overrides (no run, no output folder);
    `hydra`: with Hydra's own node (hydra.runtime.choices: the option of each group in use)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose(config_name=stage, overrides=overrides, return_hydra_config=hydra)


def common_defaults(stage: str, cfg: DictConfig) -> list[tuple[str, str]]:
    """(key, its value in `cfg`) for the stage's COMMON_KEYS; a mandatory key shows `??? (required)`."""
    out = []
    for key in COMMON_KEYS[stage]:
        if OmegaConf.is_missing(cfg, key):
            out.append((key, "??? (required)"))
        elif unset := _unresolvable(cfg, key):
            out.append((key, f"{unset} (unset: give {key}=...)"))
        else:
            value = OmegaConf.select(cfg, key, throw_on_missing=True)
            # by key, as every file memex writes does: a webhook's URL is its secret (redact_text alone cannot
            # tell https://hooks.example.com/abc/SECRET from a plain URL)
            value = redact({key.rsplit(".", 1)[-1]: value})[key.rsplit(".", 1)[-1]]
            out.append((key, redact_text(format_default(value))))
    return out


def _unresolvable(cfg: DictConfig, key: str) -> str | None:
    """The key's own text where it reads an unset environment variable (storage=s3's $MEMEX_BUCKET), else None."""
    from omegaconf.errors import InterpolationResolutionError

    try:
        OmegaConf.select(cfg, key, throw_on_missing=True)
    except InterpolationResolutionError:
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(cfg, parent) if parent else cfg
        return str(node._get_node(leaf)._value())
    return None


def stage_help(stage: str, overrides: list[str]) -> str:
    """`memex <stage> --help`: what it does, its config groups (with the overrides' choices) and common keys."""
    cfg = compose_config(stage, overrides)
    # the options in use as composed: a preset's `override /triage: none` and the like included (the command
    # line's alone listed triage=auto under preset=paper, beside its common keys' paper values)
    choices = dict(compose_config(stage, overrides, hydra=True).hydra.runtime.choices)
    lines = [f"usage: memex [-v] {stage} [key=value ...]   (Hydra overrides)", "",
             f"memex {stage}: {SUMMARIES[stage]}", "", DESCRIPTIONS[stage], "",
             "config groups (group=option in use; the other options in conf/<group>/):"]
    for group, option, options in config_groups(stage):
        current = choices.get(group, option)
        others = [o for o in options if o != current]
        lines.append(f"  {group}={current if current is not None else 'null'}"
                     + (f"   (also: {', '.join(others)})" if others else ""))
    if (tune := choices.get("tune")) and (CONF_DIR / "tune" / f"{tune}.yaml").is_file():
        lines.append(f"  tune={tune}   (this model's own tuning, conf/tune/; ~tune drops it)")
    pairs = common_defaults(stage, cfg)
    width = max(len(k) for k, _ in pairs)
    lines += ["", "common keys (set one with key=value; shown: its current value):"]
    lines += [f"  {k:<{width}}  {v}" for k, v in pairs]
    lines += ["", f"every key and its value:  memex {stage} [key=value ...] --cfg job",
              f"e.g.  memex {stage} {pairs[0][0]}=... --cfg job"]
    return "\n".join(lines)  # the values are redacted (common_defaults); `key=value` is no credential


CFG_FLAGS = ("--cfg", "-c")


def _cfg_flag(args: list[str]) -> str | None:
    """The value of Hydra's --cfg / -c (job, hydra, all) among `args`, or None."""
    for i, a in enumerate(args):
        if a in CFG_FLAGS and i + 1 < len(args):
            return args[i + 1]
        if a.startswith("--cfg="):
            return a.split("=", 1)[1]
    return None


def help_overrides(args: list[str]) -> tuple[list[str], str]:
    """The overrides `memex <stage> ... --help` composes with, and a note for its end: Hydra's flags and their
    arguments dropped (`--cfg job --help` read `job` as an override), a -m sweep's first value (its jobs differ
    only by it: "Ambiguous value for argument" was the answer)."""
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser, out, swept = OverridesParser.create(), [], []
    for text in get_args_parser().parse_known_args(args)[0].overrides:
        o = parser.parse_override(text)
        if not o.is_sweep_override():
            out.append(text)
            continue
        try:
            first = next(iter(o.sweep_string_iterator()))
        except Exception:  # noqa: BLE001 - interval() or glob(): no first value to show
            swept.append(f"{o.get_key_element()} (left out)")
            continue
        out.append(f"{o.get_key_element()}={first}")
        swept.append(out[-1])
    note = (f"\n\na -m sweep: shown for its first job, {', '.join(swept)}; each job differs only by the swept "
            "values" if swept else "")
    return out, note


def print_out(text: str) -> None:
    """Print a command's text (--help, --cfg) to stdout. A reader that stops early (`memex audit --cfg job | head`)
    closes the pipe: that is no error (it printed "memex: error: [Errno 32] Broken pipe"); the rest is dropped, as
    Python's docs advise (stdout pointed at devnull, so the flush at exit raises nothing either)."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def print_config(stage: str, args: list[str], which: str) -> str:
    """`memex <stage> ... --cfg job`: the composed config as YAML, credentials redacted (memex/redact.py), as
    Hydra prints it (unresolved; `--resolve` resolves). memex prints the job's config whatever `which` asks:
    Hydra's own (`hydra`, `all`) lists the raw command line among its overrides."""
    if which not in ("job", "hydra", "all"):
        raise C.ConfigError(f"--cfg {which}: one of job, hydra, all")
    flags = {*CFG_FLAGS, "--resolve", which}
    overrides = [a for a in args if a not in flags and not a.startswith(("--cfg=", "-"))]
    cfg = compose_config(stage, overrides)
    data = redact(OmegaConf.to_container(cfg, resolve="--resolve" in args))
    note = "" if which == "job" else "# memex prints the job's config only (Hydra's lists the raw command line)\n"
    return note + OmegaConf.to_yaml(OmegaConf.create(data)).rstrip("\n")


def pin_mismatches(constraints: str, version_of) -> list[str]:
    """`pkg==pinned` lines of a constraints file against the installed versions (`version_of(pkg)`: the
    version, or None when it is not installed, e.g. faiss-cpu on a GPU node); a local tag (2.13.0+cu130)
    is not a difference. Returns "pkg: pinned X, installed Y" for each package that differs."""
    out = []
    for line in constraints.splitlines():
        name, sep, pinned = line.split("#", 1)[0].strip().partition("==")
        if not sep:
            continue
        have = version_of(name.strip())
        if have is not None and have.split("+", 1)[0] != pinned.strip():
            out.append(f"{name.strip()}: pinned {pinned.strip()}, installed {have}")
    return out


def check_image_matches_checkout() -> None:
    """Under `ray job submit --working-dir .` the checkout's code runs on the image's packages: a checkout
    whose constraints.txt moved a pin (diffusers, transformers) ran on yesterday's image, and every actor
    failed after the index build. Refused before any work, naming the packages; outside a job, nothing."""
    import os
    from importlib import metadata
    from pathlib import Path

    from memex.storage import RAY_JOB_CONFIG

    pins = Path(C.MEMEX_HOME) / "constraints.txt"
    if not os.environ.get(RAY_JOB_CONFIG) or not pins.is_file():
        return

    def version_of(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    differ = pin_mismatches(pins.read_text(), version_of)
    if differ:
        raise C.ConfigError(f"this checkout's {pins} pins other versions than this job's Python has ("
                            f"{'; '.join(differ[:4])}{'; ...' if len(differ) > 4 else ''}): rebuild the image from "
                            "this checkout (README, On a cluster, step 0) and name its tag in cluster.yaml, or submit "
                            "the checkout the image was built from")


def main() -> None:
    from memex import console

    if any(a in VERBOSE_FLAGS for a in sys.argv[1:]):  # ours, before Hydra (which has no -v) sees them
        console.VERBOSE = True
        sys.argv[1:] = [a for a in sys.argv[1:] if a not in VERBOSE_FLAGS]
    if len(sys.argv) >= 2 and sys.argv[1] in HELP_FLAGS:
        print(stage_list())  # asked for: stdout, exit 0
        sys.exit(0)
    if len(sys.argv) < 2 or sys.argv[1] not in STAGES:  # no stage, or not one: usage error, as argparse (exit 2)
        later = next((a for a in sys.argv[2:] if a in STAGES), None)
        if len(sys.argv) >= 2 and "=" in sys.argv[1]:  # an override before the stage: its value may be a credential
            key = redact_text(sys.argv[1].partition("=")[0])
            print(f"memex: error: {key}=... comes before the stage: the stage comes first, memex {later or '<stage>'} "
                  "key=value ... (the value is not repeated here)", file=sys.stderr)
        elif len(sys.argv) >= 2:
            print(f"memex: error: {redact_text(repr(sys.argv[1]))} is not a stage", file=sys.stderr)
        if later is None:
            print(stage_list(), file=sys.stderr)
        sys.exit(2)
    stage = sys.argv.pop(1)
    if stage in SCHEMAS and any(a in HELP_FLAGS for a in sys.argv[1:]):
        try:
            check_overrides(sys.argv[1:], SCHEMAS[stage])  # an unknown key: named with the nearest one
            overrides, note = help_overrides(sys.argv[1:])
            text = stage_help(stage, overrides) + note
        except Exception as e:  # noqa: BLE001 - a bad override: one line, as a run would say it
            print(f"memex: error: {redact_text(str(e).splitlines()[0] if str(e) else repr(e))}", file=sys.stderr)
            sys.exit(1)
        print_out(text)
        sys.exit(0)
    if stage in SCHEMAS and (cfg_flag := _cfg_flag(sys.argv[1:])):
        try:  # Hydra's own --cfg printed the config raw: a storage secret, a webhook URL (README: every printout)
            check_overrides(sys.argv[1:], SCHEMAS[stage])
            text = print_config(stage, sys.argv[1:], cfg_flag)
        except Exception as e:  # noqa: BLE001 - a bad override: one line, as a run would say it
            print(f"memex: error: {redact_text(str(e).splitlines()[0] if str(e) else repr(e))}", file=sys.stderr)
            sys.exit(1)
        print_out(text)
        sys.exit(0)
    sys.argv[0] = f"memex {stage}"
    if stage in SCHEMAS:
        try:
            check_overrides(sys.argv[1:], SCHEMAS[stage])
            check_image_matches_checkout()
        except C.ConfigError as e:
            print(f"memex: error: {redact_text(str(e))}", file=sys.stderr)
            sys.exit(1)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    install_log_redaction()  # every log record of this process, whatever handlers Hydra sets up later
    STAGES[stage]()
    if SWEEP_FAILURES:  # each printed its error as it ran; the other jobs ran on
        print(f"memex: {len(SWEEP_FAILURES)} job(s) of the sweep failed: {'; '.join(SWEEP_FAILURES)}", file=sys.stderr)
        sys.exit(1)
