"""``lm-gym feedback``: serve, sample, import, export, stats and invite, on one database (``--db``)."""

from __future__ import annotations

import argparse
import json
import os
import secrets

from lm_gym.models import cache_dir

ADMIN_TOKEN_VARIABLE = "LM_GYM_FEEDBACK_ADMIN_TOKEN"


def add_feedback_commands(commands) -> None:
    """Add the ``feedback`` command group to the ``lm-gym`` parser's subcommands."""
    database = argparse.ArgumentParser(add_help=False)
    database.add_argument("--db", help="a SQLAlchemy URL, e.g. postgresql+psycopg://user@host/db (default: "
                                       "SQLite feedback.db under --dir)")
    database.add_argument("--dir", help="directory of the default SQLite database (default: the lm-gym cache's "
                                        "feedback/ folder, or a run directory)")
    feedback = commands.add_parser("feedback", help="collect human feedback: a rating web app and its exports")
    group = feedback.add_subparsers(dest="feedback_command", required=True)
    _add_serve(group, database)
    _add_sample(group, database)
    load = group.add_parser("import", parents=[database], help="load (prompt, response) or "
                            "(prompt, response_a, response_b) rows from a JSONL/CSV file")
    load.add_argument("file")
    load.set_defaults(handler=run_import)
    _add_export(group, database)
    stats = group.add_parser("stats", parents=[database], help="judgements per rater and item, agreement, "
                             "gold accuracy, time per item, arena scores")
    stats.add_argument("--json", action="store_true", help="print the numbers as JSON")
    stats.set_defaults(handler=run_stats)
    invite = group.add_parser("invite", parents=[database], help="print a rater's personal link (or an app's API key)")
    invite.add_argument("name")
    invite.add_argument("--app", action="store_true", help="an API key for a deployed application's signals")
    invite.add_argument("--url", default="http://127.0.0.1:8000", help="the server's address, for the link")
    invite.set_defaults(handler=run_invite)


def open_store(args):
    """The store named by ``--db``, or the SQLite file under ``--dir`` (default: the cache's feedback/)."""
    from lm_gym.feedback.store import FeedbackStore, default_url

    return FeedbackStore(args.db or default_url(args.dir or cache_dir() / "feedback"))


def _add_serve(group, database) -> None:
    serve = group.add_parser("serve", parents=[database], help="start the rating web app")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--ratings-per-item", type=int, default=3, help="judgements wanted per item (default 3)")
    serve.add_argument("--admin-token", help=f"the admin secret, at least 16 characters (default: ${ADMIN_TOKEN_VARIABLE}; "
                       "else the database's, made and printed on the first start)")
    serve.add_argument("--new-admin-token", action="store_true", help="replace the database's admin token with a "
                       "new one and print it")
    serve.add_argument("--workers", type=int, default=1, help="server processes (default 1)")
    serve.set_defaults(handler=run_serve)


def run_serve(args) -> int:
    """Start the app with uvicorn (``--workers`` processes); print its address and the admin link."""
    import uvicorn

    from lm_gym.feedback.web import WORKER_ENVIRONMENT, create_app

    if args.workers < 1 or args.ratings_per_item < 1:
        raise ValueError("--workers and --ratings-per-item must be >= 1")
    store = open_store(args)  # creates or migrates the schema once, before any worker starts
    base = f"http://{args.host}:{args.port}"
    admin = admin_line(store, args.admin_token or os.environ.get(ADMIN_TOKEN_VARIABLE), args.new_admin_token, base)
    print(f"lm-gym feedback on {base} (database {store.engine.url.render_as_string(hide_password=True)}, "
          f"schema version {store.schema_version()}, {args.workers} worker(s))")
    print(admin)
    print(f"API schema: {base}/openapi.json", flush=True)
    if args.workers == 1:
        uvicorn.run(create_app(store, None, args.ratings_per_item), host=args.host, port=args.port,
                    log_level="warning", access_log=False)  # at "warning" the access log shows nothing anyway
        return 0
    url = store.engine.url.render_as_string(hide_password=False)
    store.close()
    os.environ.update(zip(WORKER_ENVIRONMENT, (url, str(args.ratings_per_item))))
    uvicorn.run("lm_gym.feedback.web:app_from_environment", factory=True, workers=args.workers, host=args.host,
                port=args.port, log_level="warning", access_log=False)
    return 0


def admin_line(store, token: str | None, new: bool, base: str) -> str:
    """Make ``token`` the database's admin token, or a new random one when ``new`` or when the database has
    none; return the line ``serve`` prints: the admin link when the token was given or made now, else where
    to find it (the database keeps only the token's hash, so a made token is shown once)."""
    if token is not None and new:
        raise ValueError("give --admin-token or --new-admin-token, not both")
    if token is None and (new or store.admin_token_hash() is None):
        token = secrets.token_urlsafe(24)
    if token is None:
        return ("admin: the link printed when this database's admin token was made (lost it? restart with "
                "--new-admin-token)")
    store.set_admin_token(token)
    return f"admin: {base}/a/{token}"


def _add_sample(group, database) -> None:
    sample = group.add_parser("sample", parents=[database], help="pre-generate responses into the database")
    sample.add_argument("--model", default="default", help="'default', 'tiny', a run's model/ directory or a hub id")
    sample.add_argument("--model-b", help="arena mode: a second model; each prompt gets a hidden-name pair")
    sample.add_argument("--prompts", required=True, help="a .txt (one per line) or .jsonl prompt file")
    sample.add_argument("--responses-per-prompt", type=int, default=2)
    sample.add_argument("--max-new-tokens", type=int, default=48)
    sample.add_argument("--temperature", type=float, default=1.0)
    sample.add_argument("--batch-size", type=int, default=16)
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--device", help="e.g. 'cpu' or 'cuda' (default: CUDA when available)")
    sample.set_defaults(handler=run_sample)


def run_sample(args) -> int:
    """Sample responses (or arena pairs) for every prompt of the file and store them."""
    from lm_gym.data import read_prompt_file
    from lm_gym.feedback.sampling import SamplingSettings, sample_arena, sample_items

    prompts = read_prompt_file(args.prompts)
    settings = SamplingSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                batch_size=args.batch_size, seed=args.seed)
    if args.model_b:
        items = sample_arena(args.model, args.model_b, prompts, settings, args.device)
    else:
        items = sample_items(args.model, prompts, args.responses_per_prompt, settings, device=args.device)
    ids = open_store(args).add_items(items)
    print(f"stored {len(ids)} {'pairs' if args.model_b else 'responses'} for {len(prompts)} prompts "
          f"(item ids {ids[0]}-{ids[-1]})")
    return 0


def run_import(args) -> int:
    """Store every row of the file as an item; a malformed row stops the import with its line."""
    from lm_gym.feedback.item_files import read_items

    items = read_items(args.file)
    ids = open_store(args).add_items(list(items))
    pairs = sum(item.kind == "pair" for item in items)
    print(f"imported {len(ids)} items ({len(ids) - pairs} responses, {pairs} pairs) from {args.file}")
    return 0


def _add_export(group, database) -> None:
    export = group.add_parser("export", parents=[database], help="write ratings in the trainers' formats")
    export.add_argument("out", help="the JSONL file (or, for --format dataset, the directory) to write")
    export.add_argument("--format", choices=["feedback", "preferences", "dataset"], default="feedback")
    export.add_argument("--min-ratings", type=int, default=1, help="least votes per item (default 1)")
    export.add_argument("--aggregate", choices=["majority", "mean"], default="majority")
    export.add_argument("--min-agreement", type=float, help="drop raters whose agreement is below this")
    export.add_argument("--min-gold-accuracy", type=float, help="drop raters whose gold accuracy is below this")
    export.add_argument("--keep-duplicates", action="store_true", help="keep exact duplicate rows")
    export.add_argument("--no-signals", action="store_true", help="leave out applications' like/dislike signals")
    export.set_defaults(handler=run_export)


def run_export(args) -> int:
    """Write the export and print what each filter dropped."""
    from lm_gym.feedback.export import ExportFilters, export

    filters = ExportFilters(min_ratings=args.min_ratings, aggregate=args.aggregate,
                            min_agreement=args.min_agreement, min_gold_accuracy=args.min_gold_accuracy,
                            dedupe=not args.keep_duplicates, signals=not args.no_signals)
    for report in export(open_store(args), args.format, args.out, filters):
        print(report.summary())
    print(f"wrote {args.out}")
    return 0


def run_stats(args) -> int:
    """Print the quality numbers."""
    from lm_gym.feedback.quality import feedback_stats

    stats = feedback_stats(open_store(args))
    if args.json:
        print(json.dumps(stats, indent=2))
        return 0
    alpha = stats["agreement"]["alpha"]
    print(f"{stats['n_items']} items, {stats['n_ratings']} judgements, {stats['n_signals']} signals, "
          f"{stats['gold_items']} gold items")
    print(f"Krippendorff's alpha: {'n/a' if alpha is None else f'{alpha:.3f}'} "
          f"over {stats['agreement']['items']} items with 2+ raters")
    print(f"judgements per item: {stats['judgements_per_item']}")
    for rater in stats["raters"]:
        print(f"  {rater['name']}: {rater['judgements']} judgements, {rater['skips']} skips, agreement "
              f"{_fmt(rater['agreement'])}, gold accuracy {_fmt(rater['gold_accuracy'])}, "
              f"median {_fmt(rater['median_seconds'])} s/item")
    for model in stats["arena"]["models"]:
        low, high = model["interval"]
        print(f"  arena {model['model']}: win rate {_fmt(model['win_rate'])} [{_fmt(low)}, {_fmt(high)}] over "
              f"{model['comparisons']} comparisons, Bradley-Terry {model['bradley_terry']:.3f}")
    return 0


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def run_invite(args) -> int:
    """Invite a rater (print their link) or an application (print its API key)."""
    rater_id, token = open_store(args).invite(args.name, "app" if args.app else "rater")
    if args.app:
        print(f"API key of application {args.name!r} (id {rater_id}; shown once): {token}")
    else:
        print(f"personal link of {args.name!r} (id {rater_id}; shown once): {args.url.rstrip('/')}/r/{token}")
    return 0
