"""Hydra extensions of the command line: where configs are found, how options complete, how errors read.

- Search path: after the package's own `conf/`, Hydra also searches the `conf/` folder of every installed
  plugin (a module announced under the entry-point group `robust_train.plugins`) and every folder listed
  in `$ROBUST_TRAIN_CONFIG_PATH` (separated like PATH), so a user's `experiment=mine` or a plugin's
  `defense=my_defense` is an option like ours. `hydra.searchpath=[file:///...]` on the command line or in
  a primary config adds folders too (after these).
- Completion: Hydra completes `experiment=` with the group's top-level files only; here it also offers
  the presets in subfolders (`experiment=base/trades_wrn34`) and the options of a group given a package
  (`+attack@eval.attacks.x=pgd20`).
  `--help` and completion leave out the internal `schema/` groups, and robust-eval's list only the
  groups robust-eval takes.
- Errors: Hydra's composition errors for a misspelt key, group or option (`trainer.epochz=3`,
  `defence=trades`, `experiment=trades_wrn34`) become the project's one-line user error naming the
  closest allowed names, with exit code 2 (see `hydra_errors_reported`).

Importing this module imports no torch: Hydra imports it when it scans `hydra_plugins/` for plugins, in
every Hydra application of the environment. The package itself is imported only when robust-train's own
configs are composed (to store the schemas' defaults).
"""

from __future__ import annotations

import difflib
import functools
import importlib.util
import os
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

from hydra.core.config_search_path import ConfigSearchPath
from hydra.core.object_type import ObjectType
from hydra.plugins.search_path_plugin import SearchPathPlugin

from robust_train.errors import ConfigError
from robust_train.registry import PLUGIN_GROUP, store_schema_defaults

CONFIG_DIR = Path(__file__).resolve().parent / "conf"
# Folders of user configs searched after ours and the plugins', separated like PATH (os.pathsep).
CONFIG_PATH_ENV = "ROBUST_TRAIN_CONFIG_PATH"
_OUR_PACKAGE_PATHS = ("pkg://robust_train.conf", "pkg://robust_train/conf")
# Config groups that exist for composition only (the schemas' defaults that group YAMLs extend, stored
# by registry.store_schema_defaults): never offered in --help, completion or error messages.
INTERNAL_GROUPS = ("schema",)
# Per primary config: keys it composes from a shared schema but never reads, left out of its --help
# (robust-eval evaluates the one checkpoint it is given, so the suite's `checkpoints` and `force`,
# which tell robust-train what to evaluate after training, mean nothing there).
UNUSED_KEYS: dict[str, tuple[str, ...]] = {"evaluate": ("eval.checkpoints", "eval.force")}
# (prog, primary config name) of the command running in this process, while it runs.
_command: tuple[str, str] | None = None


# ----------------------------------------------------------------------------- search path


def plugin_config_dirs() -> list[Path]:
    """The `conf/` folder beside each module announced under the `robust_train.plugins` entry points.

    Found without importing the plugin (Hydra builds its search path before anything runs), so a broken
    plugin is reported once, by `registry.load_plugins`, with its name.
    """
    dirs: list[Path] = []
    for ep in metadata.entry_points(group=PLUGIN_GROUP):
        conf = _conf_dir_of(ep.module)
        if conf is not None and conf not in dirs:
            dirs.append(conf)
    return dirs


def _conf_dir_of(module: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.origin and spec.origin not in ("namespace", "built-in", "frozen"):
        base = Path(spec.origin).parent  # a package's __init__.py or a module file: its folder
    elif spec.submodule_search_locations:
        base = Path(next(iter(spec.submodule_search_locations)))
    else:
        return None
    conf = base / "conf"
    return conf.resolve() if conf.is_dir() else None


def user_config_paths(environ: dict[str, str] | None = None) -> list[str]:
    """Search-path entries from $ROBUST_TRAIN_CONFIG_PATH: folders (made absolute) or `pkg://` paths."""
    value = (os.environ if environ is None else environ).get(CONFIG_PATH_ENV, "")
    paths: list[str] = []
    for entry in value.split(os.pathsep):
        entry = entry.strip()
        if not entry:
            continue
        if "://" in entry:
            paths.append(entry)
            continue
        folder = Path(entry).expanduser().resolve()
        if not folder.is_dir():
            # Hydra silently skips missing folders; a typo here would look like "option not found" later.
            print(
                f"robust-train: warning: {CONFIG_PATH_ENV} entry {entry!r} is not a folder; ignored",
                file=sys.stderr,
            )
            continue
        paths.append(f"file://{folder}")
    return paths


def _is_our_config_dir(path: str) -> bool:
    if path in _OUR_PACKAGE_PATHS:
        return True
    if "://" in path and not path.startswith("file://"):
        return False
    try:
        return Path(path.removeprefix("file://")).resolve() == CONFIG_DIR
    except OSError:
        return False


class RobustTrainSearchPath(SearchPathPlugin):
    """Adds the plugins' and the user's config folders, after ours, to robust-train's search path.

    Hydra runs every installed search-path plugin for every application; this one changes nothing unless
    robust-train's own `conf/` is on the search path.
    """

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        if not any(_is_our_config_dir(str(e.path)) for e in search_path.get_path()):
            return
        # Group YAMLs extend their schema's defaults (`/schema/<group>/<name>`), which live in Hydra's
        # ConfigStore; fill it before anything composes (imports the package: only for robust-train).
        store_schema_defaults()
        present = {str(e.path) for e in search_path.get_path()}
        for conf in plugin_config_dirs():
            if f"file://{conf}" not in present:
                search_path.append("robust_train.plugins", f"file://{conf}")
        for path in user_config_paths():
            if path not in present:
                search_path.append(CONFIG_PATH_ENV, path)


def install() -> None:
    """Register the search-path plugin and nested completion with Hydra, store the schema defaults.

    Idempotent. The plugin is registered here as well as discovered from `hydra_plugins/`: an editable
    install exposes only the `robust_train` package, and the command line must work either way. Storing
    the defaults here, before Hydra starts, lets the command line report a broken plugin in one line.
    """
    from hydra.core.plugins import Plugins

    Plugins.instance().register(RobustTrainSearchPath)
    _install_nested_completion()
    _register_resolvers()
    store_schema_defaults()


def _register_resolvers() -> None:
    """`${robust_eval_dir:...}`: robust-eval's output dir beside the checkpoint (eval_dirs.py)."""
    from omegaconf import OmegaConf

    from robust_train.eval_dirs import eval_dir

    if not OmegaConf.has_resolver("robust_eval_dir"):
        OmegaConf.register_new_resolver("robust_eval_dir", eval_dir)


# ----------------------------------------------------------------------------- group options


def nested_options(
    loader: Any, group: str, config_name: str | None = None, overrides: Any = None
) -> list[str]:
    """Every option of `group`, those in subfolders as `sub/name` (what `group=sub/name` selects)."""
    kwargs = {"config_name": config_name, "overrides": list(overrides or [])}
    try:
        files = loader.get_group_options(group, results_filter=ObjectType.CONFIG, **kwargs)
        subgroups = loader.get_group_options(group, results_filter=ObjectType.GROUP, **kwargs)
    except Exception:  # completion and error messages must not fail on a broken search path
        return []
    options = list(files)
    for sub in subgroups:
        options += [
            f"{sub}/{name}" for name in nested_options(loader, f"{group}/{sub}", config_name, overrides)
        ]
    return sorted(options)


def closest_options(option: str, options: list[str], n: int = 3) -> list[str]:
    """Options sharing the name's last part (`trades_wrn34` -> `base/trades_wrn34`), else the closest ones.

    Similarity is the better of the full name's and the last part's; names well behind the best are
    dropped, so one clear match is offered alone.
    """
    leaf = option.rsplit("/", 1)[-1]
    same_leaf = [o for o in options if o.rsplit("/", 1)[-1] == leaf and o != option]
    if same_leaf:
        return same_leaf[:n]

    def score(candidate: str) -> float:
        full = difflib.SequenceMatcher(None, option, candidate).ratio()
        part = difflib.SequenceMatcher(None, leaf, candidate.rsplit("/", 1)[-1]).ratio()
        return max(full, part)

    scored = sorted(((score(o), o) for o in options), key=lambda t: -t[0])
    if not scored or scored[0][0] < 0.6:
        return []
    best = scored[0][0]
    return [o for s, o in scored[:n] if s >= 0.6 and s >= best - 0.05]


def _did_you_mean(names: list[str]) -> str:
    if not names:
        return ""
    return "; did you mean " + " or ".join(f"`{n}`" for n in names) + "?"


# ----------------------------------------------------------------------------- completion

_completion_installed = False


def _install_nested_completion() -> None:
    """Make Hydra's shell completion (bash, zsh, fish) offer options in a group's subfolders.

    Hydra has one completion plugin per shell and refuses a second one, so the shared option lookup of
    its base class is extended instead.
    """
    global _completion_installed
    if _completion_installed:
        return
    from hydra.plugins.completion_plugin import CompletionPlugin

    original = getattr(CompletionPlugin, "_query_config_groups", None)
    if original is None:  # another Hydra version: keep its completion as it is
        return

    def query_config_groups(
        self: Any, word: str, config_name: str | None, words: list[str]
    ) -> tuple[list[str], bool]:
        matched, exact = original(self, word, config_name, words)
        shown = _group_filter(self.config_loader)
        matched = [m for m in matched if shown(_group_of(m))]
        sign = word[:1] if word[:1] in ("+", "~") else ""
        bare = word[len(sign) :]
        if "=" not in bare:
            return matched, exact
        key = bare[: bare.rfind("=")]
        group = key.split("@", 1)[0]  # `attack@eval.attacks.x`: the options of `attack`
        if not shown(key):
            return matched, exact
        names = [f"{sign}{key}={o}" for o in nested_options(self.config_loader, group, config_name, words)]
        extra = [n for n in names if n.startswith(word)]
        return sorted(set(matched) | set(extra)), exact or bool(extra)

    CompletionPlugin._query_config_groups = query_config_groups  # type: ignore[method-assign]
    _install_help_filter()
    _completion_installed = True


def _install_help_filter() -> None:
    """`--help` lists the groups the command uses, without the internal ones (see `_group_filter`)."""
    from hydra._internal.hydra import Hydra

    original = getattr(Hydra, "format_config_groups", None)
    if original is None:  # another Hydra version: its own listing
        return

    def format_config_groups(self: Any, predicate: Callable[[str], bool], compact: bool = True) -> str:
        shown = _group_filter(self.config_loader, _packaged_groups())
        return original(self, lambda group: predicate(group) and shown(group), compact)

    Hydra.format_config_groups = format_config_groups  # type: ignore[method-assign]

    original_help = getattr(Hydra, "get_help", None)
    if original_help is None:
        return

    def get_help(self: Any, help_cfg: Any, cfg: Any, *args: Any, **kwargs: Any) -> str:
        from omegaconf import OmegaConf, open_dict

        # Keys the command's config composes (a shared schema) but never reads.
        for key in UNUSED_KEYS.get(_command[1], ()) if _command is not None else ():
            parent, _, leaf = key.rpartition(".")
            node = OmegaConf.select(cfg, parent) if parent else cfg
            if node is not None and leaf in node:
                with open_dict(node):
                    node.pop(leaf)
        return str(original_help(self, help_cfg, cfg, *args, **kwargs))

    Hydra.get_help = get_help  # type: ignore[method-assign]


def _group_of(word: str) -> str:
    """The group part of a completion candidate or override: `+attack@x=pgd20` -> `attack@x`."""
    word = word.lstrip("+~")
    return word.split("=", 1)[0]


def _packaged_groups() -> set[str]:
    """Groups this run selects under a package somewhere (`attack@eval.attacks.pgd20`)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return set()
    return {str(key).split("@", 1)[0] for key in HydraConfig.get().runtime.choices if "@" in str(key)}


def _group_filter(loader: Any, packaged: set[str] | None = None) -> Callable[[str], bool]:
    """Whether to offer a group (or a group path, `experiment/base`; keys pass): internal groups never,
    other groups when the running command's primary config selects them, a config of this run selects
    them under a package, or the word itself names a package (`attack@eval.attacks.x`)."""
    used = set(command_groups(loader, _command[1])) if _command is not None else None
    groups = set(_all_groups(loader, internal=True))

    def shown(word: str) -> bool:
        top = word.split("@", 1)[0].split("/", 1)[0]
        if top in INTERNAL_GROUPS:
            return False
        if used is None or top not in groups or "@" in word or top == "hydra":
            return True
        return top in used or top in (packaged or set())

    return shown


# ----------------------------------------------------------------------------- errors


def _config_loader() -> Any:
    from hydra.core.global_hydra import GlobalHydra

    gh = GlobalHydra.instance()
    if not gh.is_initialized():
        return None
    try:
        return gh.config_loader()
    except Exception:
        return None


def command_groups(loader: Any, config_name: str) -> list[str]:
    """The groups a command's primary config selects in its defaults list (null ones included)."""
    try:
        primary = loader.repository.load_config(config_name)
    except Exception:
        return []
    if primary is None:
        return []
    groups = []
    for d in primary.defaults_list or []:
        group = getattr(d, "group", None)
        if group and not group.startswith("hydra/") and group not in groups:
            groups.append(group)
    return groups


def _top_level_keys(loader: Any, config_name: str) -> list[str]:
    try:
        primary = loader.repository.load_config(config_name)
    except Exception:
        return []
    keys = [str(k) for k in primary.config.keys()] if primary is not None else []
    return [k for k in keys if k != "hydra"]


def _all_groups(loader: Any, internal: bool = False) -> list[str]:
    """Top-level groups on the search path (without `hydra`; without the internal ones by default)."""
    try:
        groups = [g for g in loader.list_groups("") if g != "hydra"]
    except Exception:
        return []
    return groups if internal else [g for g in groups if g not in INTERNAL_GROUPS]


def unknown_key_message(key: str, allowed: list[str], what: str = "key") -> str:
    """`trainer.epochz is not a known key; did you mean `trainer.epochs`?` (or the allowed names)."""
    parent, _, leaf = key.rpartition(".")
    close = difflib.get_close_matches(leaf, allowed, n=1, cutoff=0.5)
    if close:
        return f"{key} is not a known {what}; did you mean `{parent + '.' if parent else ''}{close[0]}`?"
    return f"{key} is not a known {what}; allowed: {', '.join(sorted(allowed))}"


def unknown_option_message(group: str, option: str, options: list[str]) -> str:
    hint = _did_you_mean(closest_options(option, options))
    return (
        f"{group}={option} is not a known option of `{group}`{hint} (options: {', '.join(options) or 'none'})"
    )


def unused_group_message(prog: str, group: str, used: list[str]) -> str:
    return f"`{group}` is not a config group of {prog}; {prog} takes: {', '.join(used) or 'none'}"


def _split_missing_config(path: str) -> tuple[str, str]:
    """`experiment/base/x` -> (`experiment`, `base/x`); `hydra/launcher/x` -> (`hydra/launcher`, `x`)."""
    parts = path.split("/")
    cut = 2 if parts[0] == "hydra" and len(parts) > 2 else 1
    return "/".join(parts[:cut]), "/".join(parts[cut:])


def hydra_error_message(err: BaseException, prog: str, config_name: str) -> str | None:
    """One line for Hydra's errors about unknown keys, groups and options; None for any other error."""
    from hydra.errors import ConfigCompositionException, MissingConfigException

    loader = _config_loader()
    if isinstance(err, MissingConfigException):
        missing = getattr(err, "missing_cfg_file", None)
        if not missing or "/" not in missing or loader is None:
            return None
        group, option = _split_missing_config(missing)
        return unknown_option_message(group, option, nested_options(loader, group))
    if not isinstance(err, ConfigCompositionException):
        return None
    text = str(err)
    match = re.match(r"Could not (?:override|delete from config\.) '([^']+)'", text)
    if match is None or loader is None:
        return None
    key = match.group(1)
    groups = _all_groups(loader)
    if "No match in the defaults list" in text:
        if key.split("/")[0] in groups:
            return unused_group_message(prog, key, command_groups(loader, config_name))
        return None
    if "." in key:
        parent = getattr(err.__cause__, "parent_node", None)
        if parent is None or not hasattr(parent, "keys"):
            return None
        return unknown_key_message(key, [str(k) for k in parent.keys()])
    allowed = sorted(set(_top_level_keys(loader, config_name)) | set(command_groups(loader, config_name)))
    return unknown_key_message(key, allowed, "key or config group")


def check_group_overrides(
    overrides: list[str], prog: str, config_name: str, choices: list[str] | None = None
) -> None:
    """Refuse overrides that select a group the command does not use, or add an unknown top-level key.

    Hydra accepts `+defense=trades` for robust-eval (the group exists, so it is appended to the defaults)
    and `+defence=trades` (a new key) without complaint; both would be silently ignored by the run.
    A group given with an explicit package (`+attack@eval.attacks.x=pgd20`) goes where the package says;
    the run's schema validates that place. `choices` are the composed `hydra.runtime.choices` keys, to
    point a group that is only used under a package (`attack@eval.attacks.pgd20`) to that form.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    loader = _config_loader()
    if loader is None:
        return
    used = command_groups(loader, config_name)
    groups = _all_groups(loader, internal=True)
    keys = _top_level_keys(loader, config_name)
    for override in OverridesParser.create().parse_overrides(overrides):
        if override.is_hydra_override():
            continue
        key = override.key_or_group
        top = key.split("/")[0]
        if top in groups or loader.repository.group_exists(key):
            if override.package is None and top not in used:
                placed = [c for c in choices or [] if c.startswith(f"{top}@")]
                if placed:
                    value = (override.input_line or "").split("=", 1)[-1]
                    raise ConfigError(
                        f"{override.input_line}: `{top}` options are placed with a package, as in "
                        f"{', '.join(placed[:3])}; e.g. +{top}@eval.attacks.NAME={value}"
                    )
                raise ConfigError(unused_group_message(prog, top, used))
        elif "." not in key and (override.is_add() or override.is_force_add()) and key not in keys:
            raise ConfigError(unknown_key_message(key, sorted(set(keys) | set(used)), "key or config group"))


@contextmanager
def hydra_errors_reported(prog: str, config_name: str, fail: Callable[[str, str], None]) -> Iterator[None]:
    """While Hydra runs, turn its unknown key/group/option errors into `fail(prog, one_line)`.

    Hydra prints its own errors in `hydra._internal.utils.run_and_report` (several lines, exit code 1)
    before anything of ours sees them; that function is swapped for the duration of the call. Other
    errors go to Hydra's reporting unchanged; with HYDRA_FULL_ERROR=1 everything is raised as before.
    """
    from hydra._internal import utils as hydra_utils

    from robust_train.errors import RobustTrainError

    original = getattr(hydra_utils, "run_and_report", None)
    if original is None:  # another Hydra version: its own messages
        yield
        return

    def run_and_report(func: Any) -> Any:
        try:
            return func()
        except Exception as err:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            if isinstance(err, RobustTrainError):  # raised by our callbacks before a job starts
                fail(prog, str(err))
            message = hydra_error_message(err, prog, config_name)
            if message is None:
                return original(functools.partial(_reraise, err))
            fail(prog, message)

    global _command
    hydra_utils.run_and_report = run_and_report
    _command = (prog, config_name)
    try:
        yield
    finally:
        hydra_utils.run_and_report = original
        _command = None


def _reraise(err: BaseException) -> None:
    raise err
