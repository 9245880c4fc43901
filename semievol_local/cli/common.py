"""What every command shares: the Typer apps, the `command` decorator (a `UserError` becomes one line and
exit 2), options declared once (`options_from` a config class, `option_of` one of its fields, the model,
mode and max-tokens options), and `invocation`, the command as a user would type it again."""
from __future__ import annotations

import dataclasses
import functools
import inspect
import os
import sys
import typing

import typer
from typer.core import TyperGroup

try:  # typer >= 0.2x carries its own copy of click, whose exceptions it raises
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover
    from click import exceptions as click_errors

from ..core import config
from ..core.errors import UserError
from ..method.models import DEFAULT_MODEL
from . import ui


class OneLineUsage(TyperGroup):
    """The top command group: a flag or argument typed wrong (unknown option, bad value, missing option) is one
    line on stderr and exit 2, like every other mistake, instead of click's usage box."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        try:
            rv = super().main(*args, standalone_mode=False, **kwargs)
        except click_errors.NoArgsIsHelpError as e:  # no command given: the help, as before
            typer.echo(e.ctx.get_help() if e.ctx else e.format_message())
            rv = e.exit_code
        except click_errors.UsageError as e:
            where = e.ctx.command_path if e.ctx else "semievol"
            msg = e.format_message().rstrip(".")
            ui.error(f"{where}: {msg[:1].lower() + msg[1:]}; see `{where} --help`")
            rv = 2
        except click_errors.ClickException as e:
            ui.error(e.format_message())
            rv = e.exit_code
        except typer.Abort:
            ui.error("aborted")
            rv = 1
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(cls=OneLineUsage, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Semi-supervised fine-tuning (SemiEvol) of GGUF models: MLX trains LoRA, llama.cpp serves it.")
models_app = typer.Typer(no_args_is_help=True, help="List, fetch and inspect models.")
data_app = typer.Typer(no_args_is_help=True, help="Check task data.")
adapter_app = typer.Typer(no_args_is_help=True, help="Check trained adapters.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks that print figures.")
app.add_typer(models_app, name="models")
app.add_typer(data_app, name="data")
app.add_typer(adapter_app, name="adapter")
app.add_typer(bench_app, name="bench")
MODEL_HELP = "Alias, .gguf path, or hf:owner/repo/file.gguf."


def model_option(help: str = MODEL_HELP):
    """`--model`/`-m`, the default model alias: declared here once for every command that takes a model."""
    return typer.Option(DEFAULT_MODEL, "--model", "-m", help=help)


def mode_option():
    """`--mode` of the commands that answer questions (eval, predict): the run's own option."""
    return option_of(config.RunConfig, "mode")


def max_tokens_option():
    """`--max-tokens` of eval and predict: the run's own option."""
    return option_of(config.RunConfig, "max_tokens")


def data_option(default=..., help: str = "Task folder with labeled, unlabeled and test splits."):
    """`--data`/`-d`: the task folder or split file a command reads."""
    return typer.Option(default, "--data", "-d", help=help)


def out_option(default=..., help: str = "A new folder for what the command writes."):
    """`--out`/`-o`: where a command writes."""
    return typer.Option(default, "--out", "-o", help=help)


def json_option(what: str):
    """`--json FILE`: a command's figures as JSON."""
    return typer.Option(None, "--json", help=f"Write {what} here (JSON).")


ADAPTER_HELP = "GGUF LoRA adapter: an adapter.gguf, a `semievol train` folder, or a run folder (its last round's adapter)."


def adapter_option(help: str = ADAPTER_HELP):
    """`--adapter`/`-a` of the commands that answer with one adapter (eval, predict); `export.adapter_path`
    resolves it, for them and for `serve`."""
    return typer.Option(None, "--adapter", "-a", help=help)


def command(group: typer.Typer, name: str | None = None):
    """Register a command that reports `UserError` as one line + exit 2, and Ctrl-C as exit 130."""

    def wrap(fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except UserError as e:
                ui.error(str(e))
                raise typer.Exit(e.exit_code) from None
            except KeyboardInterrupt:
                ui.error("interrupted; run the same command again to resume")
                raise typer.Exit(130) from None
            except (typer.Exit, typer.Abort, SystemExit):
                raise
            except Exception as e:  # a bug, not the user's mistake: one line, the traceback on request
                if os.environ.get("SEMIEVOL_DEBUG"):
                    raise
                ui.error(f"internal error: {type(e).__name__}: {e} (set SEMIEVOL_DEBUG=1 for the traceback)")
                raise typer.Exit(1) from None

        return group.command(name)(run)

    return wrap


# EngineConfig's fields for llama-servers: offered only by the commands that can ask them
SERVER_FIELDS = ("server", "server_timeout", "api_key_file")


def options_from(*classes, skip: tuple[str, ...] = ()):
    """Add each dataclass field of `classes` to a command as `--field-name` (default and help from the field).

    The command receives them as one instance per class, in a keyword argument named after the class
    in snake case (`EngineConfig` -> `engine_config`). Fields named in `skip` are not offered (the command
    would ignore them) and keep their defaults.
    """

    def deco(fn):
        sig = inspect.signature(fn)
        params = [p for p in sig.parameters.values() if p.name not in {_arg(c) for c in classes}]
        for cls in classes:
            for f in dataclasses.fields(cls):
                if f.name in skip:
                    continue
                default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
                flag = config.flag(f, toggle=True)
                params.append(inspect.Parameter(_param(flag), inspect.Parameter.KEYWORD_ONLY, annotation=type(default),
                                                default=typer.Option(default, flag, help=f.metadata.get("help"),
                                                                     rich_help_panel=cls.__doc__.splitlines()[0])))

        @functools.wraps(fn)
        def run(**kwargs):
            for cls in classes:
                kwargs[_arg(cls)] = cls(**{f.name: kwargs.pop(_param(config.flag(f, toggle=True)))
                                           for f in dataclasses.fields(cls) if f.name not in skip})
                config.check(kwargs[_arg(cls)])  # every option within its declared range, before anything runs
            return fn(**kwargs)

        # typer must see the new signature, not the original's; and the annotations resolved where `fn` is
        # written (typer evaluates string annotations in this module's namespace once `__wrapped__` is gone)
        hints = typing.get_type_hints(fn)
        params = [p.replace(annotation=hints.get(p.name, p.annotation)) for p in params]
        run.__signature__ = sig.replace(parameters=params)
        run.__annotations__ = {p.name: p.annotation for p in params if p.annotation is not inspect.Parameter.empty}
        del run.__wrapped__
        return run

    return deco


def option_of(cls, name: str, help: str = "", default=dataclasses.MISSING):
    """A command's own option declared by a config field (its flag, default and help, plus `help`): for the
    commands that take one option of a config class, not all of them. `default`: this command's own (a
    benchmark's fixed shape); the command checks the value with `config.check` like the class's."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    value = f.default if default is dataclasses.MISSING else default
    own = default is not dataclasses.MISSING  # a default outside the field's range means something here (-1: all)
    return typer.Option(value, config.flag(f, toggle=True), help=f.metadata.get("help", "") + help,
                        min=None if own else f.metadata.get("min"), max=None if own else f.metadata.get("max"))


def _param(flag: str) -> str:
    """`--train-seed` -> `opt_train_seed`; `--iwp/--no-iwp` -> `opt_iwp` (prefixed: `--as` is a keyword)."""
    return "opt_" + flag.split("/")[0].lstrip("-").replace("-", "_")


def _arg(cls) -> str:
    import re

    return re.sub(r"(?<!^)(?=[A-Z])", "_", cls.__name__).lower()


def invocation(ctx: typer.Context) -> str:
    """The command being run, as a user would type it again: its path and every non-default option."""
    import shlex

    names, c = [], ctx  # the subcommands' names, whatever started the program (`semievol`, `python -m ...`)
    while c.parent is not None:
        names.append(c.info_name)
        c = c.parent
    parts = ["semievol", *reversed(names)]
    for p in ctx.command.params:
        v = ctx.params.get(p.name)
        if isinstance(v, tuple):
            v = list(v)
        default = list(p.default) if isinstance(p.default, (list, tuple)) else p.default
        if v is None or v == default:
            continue
        values = v if isinstance(v, list) else [v]
        if p.param_type_name == "argument":
            parts += [str(x) for x in values]
        elif getattr(p, "is_flag", False) and p.secondary_opts:
            parts.append(p.opts[0] if v else p.secondary_opts[0])
        else:
            for x in values:
                parts += [p.opts[0], str(x)]
    return shlex.join(parts)



def typed_in(ctx: typer.Context, name: str) -> bool:
    """Whether the user gave parameter `name` on the command line (not its default)."""
    source = ctx.get_parameter_source(name)  # an enum of typer's own click (it may vendor one): compared by name
    return getattr(source, "name", None) == "COMMANDLINE"


def given_options(ctx: typer.Context, cls) -> dict:
    """The options of `cls` given on the command line, by field name (they win over a --config file)."""
    return {f.name: ctx.params[p] for f in dataclasses.fields(cls)
            if typed_in(ctx, p := _param(config.flag(f, toggle=True)))}
