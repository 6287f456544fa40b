"""No credential reaches an output (memex/redact.py): the rule, then every file a real nightly audit
and a training run write, the webhook payload, the printouts and the log lines.

The end-to-end tests give storage.options (and data.storage_options) fake credentials that local
fsspec accepts and ignores, and values distinctive enough to appear nowhere by accident."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import shutil
import threading
import typing
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from memex import config as C
from memex.redact import (
    MASK,
    install_log_redaction,
    is_secret_name,
    redact,
    redact_text,
    redact_url,
    redact_urls,
    words,
)

from conftest import REPO, compose, free_port

KEY_ID = "AKIAMEMEXFAKE7Q2ZK4"  # distinctive fake credentials: found nowhere unless leaked
SECRET = "memexFAKEsecret9f3b1cQ"
HOOK_TOKEN = "memexHOOKtoken5e8d0a"
LEAKS = (KEY_ID, SECRET, HOOK_TOKEN)


# ---- the rule ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", [
    "key", "secret", "token", "password", "passwd", "credentials", "aws_secret_access_key", "aws_access_key_id",
    "aws_session_token", "secret_key", "client_secret", "session_token", "sas_token", "account_key", "AccountKey",
    "api_key", "apiKey", "APIKey", "x-api-key", "apikey", "access_token", "refresh_token", "private_key",
    "private_key_id", "sse_customer_key", "Authorization", "db_password", "connection_string", "conn_str",
    "storage.options.secret", "SECRET_ACCESS_KEY", "cookie"])
def test_secret_names(name):
    assert is_secret_name(name), words(name)


def _field_names(cls) -> set[str]:
    """Every field name of a config dataclass and of the dataclasses inside it (lists included)."""
    names = set()
    for name, hint in typing.get_type_hints(cls).items():
        names.add(name)
        for t in (hint, *typing.get_args(hint)):
            if dataclasses.is_dataclass(t):
                names |= _field_names(t)
    return names


def test_no_setting_of_the_typed_config_is_taken_for_a_secret():
    """A redacted setting that is not secret hides what a run did: the rule must pass every field."""
    names = set()
    for cls in (C.NightlyAuditConfig, C.TrainConfig):
        names |= _field_names(cls)
    assert {"storage", "options", "webhook", "keep", "dup_k", "id_column", "storage_options"} <= names
    # result keys written beside the config: index key, hashes, ids, counts
    names |= {"index_key", "hash_key", "sort_key", "prompt_id", "train_id", "train_gid", "sample_id", "files_signature",
              "weights_sha256", "config_sha256", "tokenizer", "max_tokens", "token_count", "keys_total", "KeyError",
              "key2", "endpoint_url", "client_kwargs", "region_name", "anon", "profile", "use_ssl"}
    assert [n for n in names if is_secret_name(n)] == []


def test_redact_masks_nested_secrets_and_keeps_everything_else():
    opts = {"key": KEY_ID, "secret": SECRET, "token": None, "anon": False, "password": 12345, "profile": "dev",
            "client_kwargs": {"endpoint_url": f"https://{KEY_ID}:{SECRET}@minio:9000", "region_name": "eu",
                              "aws_secret_access_key": SECRET},
            "headers": {"Authorization": f"Bearer {SECRET}", "Accept": "json"}, "creds": {"a": [SECRET]},
            "auth_token": ""}
    cfg = {"storage": {"root": "s3://bucket/runs", "options": opts}, "nightly": {"webhook": f"https://x.io/h/{HOOK_TOKEN}",
                                                                               "webhook_timeout_s": 10.0},
           "triage": {"keep": 5}, "index_key": "abc123", "model": {"path": "org/model", "unet": None},
           "shards": [(0, 4), (4, 8)]}
    before = json.dumps(cfg, sort_keys=True)
    out = redact(cfg)
    assert json.dumps(cfg, sort_keys=True) == before  # the input (what s3fs gets) is untouched
    text = json.dumps(out)
    assert not any(s in text for s in LEAKS)
    o = out["storage"]["options"]
    assert o["key"] == o["secret"] == o["password"] == o["creds"] == MASK
    assert o["token"] is None and o["anon"] is False and o["auth_token"] == "" and o["profile"] == "dev"
    assert o["client_kwargs"] == {"endpoint_url": "https://***@minio:9000", "region_name": "eu",
                                  "aws_secret_access_key": MASK}
    assert o["headers"] == {"Authorization": MASK, "Accept": "json"}
    assert out["nightly"] == {"webhook": "https://x.io/***", "webhook_timeout_s": 10.0}
    assert (out["triage"], out["index_key"], out["model"], out["shards"]) == ({"keep": 5}, "abc123",
                                                                             {"path": "org/model", "unet": None},
                                                                             [(0, 4), (4, 8)])
    assert redact(out) == out  # idempotent


@pytest.mark.parametrize("url, expected", [
    ("https://user:pa55@host:8080/p?x=1", "https://***@host:8080/p?x=1"),
    ("https://ghp_tok@github.com/o/r.git", "https://***@github.com/o/r.git"),
    ("https://u:pa/ss@host/x", "https://***@host/x"),  # a raw "/" in the password
    ("https://u:p@ss@host/x", "https://***@host/x"),
    # a password of digits before a raw "#" or "?": the rest looked like host:port, and passed unmasked
    ("https://user:1234#ab@host/x", "https://***@host/x"),
    ("https://u:12?34@host/x", "https://***@host/x"),
    ("https://h/x?token=abc&v=2", "https://h/x?token=***&v=2"),
    ("https://h/x?key=abc&token=def", "https://h/x?key=***&token=***"),  # Google Chat webhooks
    ("https://a.blob.core.windows.net/c/b?sv=2022-11-02&se=2030-01-01&sp=r&sig=abc%3D",
     "https://a.blob.core.windows.net/c/b?sv=2022-11-02&se=2030-01-01&sp=r&sig=***"),
    ("https://b.s3.amazonaws.com/k?X-Amz-Credential=AKIA%2F1&X-Amz-Signature=ff&X-Amz-Date=1&X-Amz-Security-Token=t",
     "https://b.s3.amazonaws.com/k?X-Amz-Credential=***&X-Amz-Signature=***&X-Amz-Date=1&X-Amz-Security-Token=***"),
    ("https://f.azurewebsites.net/api/hook?code=abc", "https://f.azurewebsites.net/api/hook?code=***"),
    ("https://app/cb#access_token=abc&state=1", "https://app/cb#access_token=***&state=1"),
    ("https://hooks.slack.com/services/T000/B000/XXXXXXXX", "https://hooks.slack.com/services/***"),
    ("https://discord.com/api/webhooks/123/tok-en", "https://discord.com/api/webhooks/***"),
    ("https://acme.webhook.office.com/webhookb2/a@b/IncomingWebhook/c/d", "https://acme.webhook.office.com/webhookb2/***"),
    # nothing to hide: unchanged
    ("s3://bucket/runs/name", "s3://bucket/runs/name"),
    ("https://huggingface.co/org/model?revision=main#readme", "https://huggingface.co/org/model?revision=main#readme"),
    ("http://127.0.0.1:9000/path/key=3/x", "http://127.0.0.1:9000/path/key=3/x"),
    ("https://registry:8443/@scope/pkg", "https://registry:8443/@scope/pkg"),  # an "@" in a path after a port
    ("https://hooks.slack.com/", "https://hooks.slack.com/"),
    # no host: urllib's urlunsplit wrote memory:/r/run, which a Store then took for a local folder
    ("memory:///r/run", "memory:///r/run"),
    ("memory:///r/run?token=abc", "memory:///r/run?token=***"),
    ("file:///tmp/runs/x", "file:///tmp/runs/x"),
])
def test_redact_url(url, expected):
    assert redact_url(url) == expected
    assert redact_url(expected) == expected  # idempotent


def test_webhook_urls_keep_only_where_they_go():
    assert redact_url(f"https://example.com/hooks/{HOOK_TOKEN}?a=1", strict=True) == "https://example.com/***"
    assert redact_url("https://u:p@example.com:8443/x", strict=True) == "https://***@example.com:8443/***"
    assert redact_url("http://127.0.0.1:9", strict=True) == "http://127.0.0.1:9"


def test_redact_text_masks_urls_and_secret_assignments_in_free_text():
    text = (f"could not override storage.options.secret={SECRET} (got {{'key': '{KEY_ID}', 'secret': \"a b {SECRET}\", "
            f"'endpoint_url': 'http://u:{SECRET}@minio/x?token={HOOK_TOKEN}'}}) password: {SECRET}")
    out = redact_text(text)
    assert not any(s in out for s in LEAKS), out
    assert "storage.options.secret=***" in out and "'key': '***'" in out and "http://***@minio/x?token=***" in out
    # not secret: left as written
    for keep in ("KeyError: 'x'", "index_key=abc", "/data/key=3/part", "tokens: 12", "prompt_id=p1",
                 "s3://b/runs/x", "memex audit: 3 of 4 prompts"):
        assert redact_text(keep) == keep
    assert redact_text(out) == out
    assert redact_urls("see https://u:p@h/x and key=1") == "see https://***@h/x and key=1"  # URLs only


def test_an_authorization_header_in_free_text_keeps_its_scheme_and_masks_its_credential():
    """`Authorization: Bearer <token>` (a header in a requests/botocore error or a debug log line) became
    `Authorization: *** <token>`: the scheme word was masked and the credential printed."""
    for scheme in ("Bearer", "Basic", "token"):
        out = redact_text(f"401 for url: headers Authorization: {scheme} {SECRET}, retrying")
        assert SECRET not in out and out == f"401 for url: headers Authorization: {scheme} ***, retrying"
        assert redact_text(out) == out
    assert redact_text(f"authorization={SECRET}") == "authorization=***"  # no scheme word: the value itself
    out = redact_text(f'Authorization: Token token="{SECRET}", retrying')  # Rails' token auth: quoted inside
    assert out == "Authorization: Token ***, retrying"


def test_a_config_without_credentials_is_unchanged():
    """The run folder names and nightly config hashes are taken over redacted settings: for every
    config without credentials they are what they were before redaction existed."""
    cfg = compose(["model.path=/m", "trainset.path=s3://b/train.parquet", "storage=s3", "storage.root=s3://b/runs",
                   "nightly.location=/ckpts", "nightly.webhook=http://127.0.0.1:9/x"], config_name="nightly")
    plain = C.plain(cfg)
    red = redact(plain)
    assert red["nightly"]["webhook"] == "http://127.0.0.1:9/***"
    red["nightly"]["webhook"] = plain["nightly"]["webhook"]
    assert red == plain


def test_settings_claim_compares_redacted_settings(tmp_path):
    """A rerun with a rotated credential resumes the same folder; the claim file holds no credential."""
    from memex.storage import Store

    store = Store(str(tmp_path))
    claim = store.join("run.json")
    store.claim(claim, redact({"model": {"path": f"https://u:{SECRET}@hub/m"}, "seed": 0}), "run", "fix")
    store.claim(claim, redact({"model": {"path": "https://u:rotated@hub/m"}, "seed": 0}), "run", "fix")
    with pytest.raises(Exception, match="other settings"):
        store.claim(claim, redact({"model": {"path": "https://u:rotated@hub/m"}, "seed": 1}), "run", "fix")
    assert SECRET not in (tmp_path / "run.json").read_text()


def test_log_records_are_redacted_whatever_the_handler():
    old = logging.getLogRecordFactory()
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    log = logging.getLogger("memex.test_redact")
    log.addHandler(handler)
    try:
        install_log_redaction()
        install_log_redaction()  # idempotent
        log.warning("opening %s with %s", f"https://u:{SECRET}@h/x", {"secret": SECRET, "key": KEY_ID})
        try:
            raise RuntimeError(f"token={HOOK_TOKEN}")
        except RuntimeError:
            log.exception("failed")
    finally:
        logging.setLogRecordFactory(old)
        log.removeHandler(handler)
    out = stream.getvalue()
    assert "https://***@h/x" in out and "RuntimeError: token=***" in out
    assert not any(s in out for s in LEAKS), out


def test_cli_errors_are_redacted(capsys):
    from memex import cli

    @cli._report_errors
    def fails(cfg):
        raise C.ConfigError(f"cannot write to https://{KEY_ID}:{SECRET}@host/runs; storage.options.token={HOOK_TOKEN}")

    with pytest.raises(SystemExit):
        fails(None)
    err = capsys.readouterr().err
    assert err.startswith("memex: error: cannot write to https://***@host/runs")
    assert not any(s in err for s in LEAKS), err


def test_report_of_an_old_summary_shows_no_credential():
    """A summary.json written before redaction existed is redacted when the report is built."""
    from test_report import _render, _summary

    html = _render(_summary(config={"storage": {"options": {"key": KEY_ID, "secret": SECRET}},
                                    "model": {"unet": f"https://u:{SECRET}@h/unet"},
                                    "nightly": {"webhook": f"https://h/{HOOK_TOKEN}"}},
                            model={"name": "m", "path": f"https://u:{SECRET}@h/m"}, run=f"s3://b/r?token={SECRET}"))
    assert "full config" in html and "***" in html
    assert not any(s in html for s in LEAKS)


def test_webhook_errors_and_payload_show_no_credential():
    from memex.stages import nightly

    url = f"http://127.0.0.1:{free_port()}/hook/{HOOK_TOKEN}?token={HOOK_TOKEN}"
    with pytest.raises(nightly.NightlyError) as e:
        nightly.post_webhook(url, {"x": 1}, 2.0)
    assert "http://127.0.0.1" in str(e.value) and HOOK_TOKEN not in str(e.value)
    row = {"location": f"https://u:{SECRET}@h/ckpt", "message": "", "outcome": "grew", "step": 1, "extracted": 2,
           "flagged_prompts": 0}
    res = nightly.NightlyResult("0" * 64, 1, [], rows=[row], trend=f"s3://b/t?sig={SECRET}", ledger="s3://b/l")
    assert SECRET not in json.dumps(nightly.payload(res)) and SECRET not in nightly.format_result(res)


# ---- end to end: every byte a real run writes ---------------------------------------------------
def assert_no_leak(*roots: Path, texts: tuple[str, ...] = ()) -> int:
    """Search every file under `roots` (raw bytes, and Parquet decoded: its pages are compressed)
    and `texts` for the fake credentials; returns how many files were searched."""
    needles = [s.encode() for s in LEAKS]
    n = 0
    for root in roots:
        for f in sorted(p for p in Path(root).rglob("*") if p.is_file()):
            n += 1
            data = f.read_bytes()
            assert not any(s in data for s in needles), f"credential in {f}"
            if f.suffix == ".parquet":
                t = pq.read_table(f)
                text = repr(t.to_pylist()) + repr(t.schema.metadata)
                assert not any(s in text for s in LEAKS), f"credential in {f} (decoded)"
    for t in texts:
        assert not any(s in t for s in LEAKS), t[-2000:]
    return n


def test_the_leak_search_finds_a_planted_credential(tmp_path):
    pq.write_table(pa.table({"a": [f"x {SECRET} y" * 50]}), tmp_path / "t.parquet", compression="zstd")
    with pytest.raises(AssertionError, match="credential in"):
        assert_no_leak(tmp_path)


class _Hook(BaseHTTPRequestHandler):
    received: list = []

    def do_POST(self):  # noqa: N802 - http.server's name
        type(self).received.append((self.path, self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.mark.slow
def test_nightly_audit_writes_no_credential_anywhere(tmp_path, caplog, capsys):
    """A real nightly audit of one demo checkpoint (index, prompts, triage, generate, filter, match,
    report, ledger, trend page, webhook) with credentials in storage.options and the webhook URL:
    they reach no file of the storage root, no payload, printout or log line. resources.executor=local:
    every unit's log lines are this process's, so caplog sees them all."""
    from memex.stages import nightly

    demo = REPO / "demo" / "checkpoints" / "demo-text-run"
    location = tmp_path / "watch"
    shutil.copytree(demo / "checkpoint-1000", location / "run" / "checkpoint-1000")
    server = HTTPServer(("127.0.0.1", free_port()), _Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/hooks/{HOOK_TOKEN}?token={HOOK_TOKEN}"
    cfg = compose([f"nightly.location={location}", f"nightly.base_model={REPO / 'demo' / 'models' / 'demo-text'}",
                   f"storage.root={tmp_path / 'runs'}", "resources.executor=local",
                   f"+storage.options.key={KEY_ID}", f"+storage.options.secret={SECRET}",
                   f"+storage.options.client_kwargs.aws_secret_access_key={SECRET}", f"nightly.webhook='{url}'",
                   "prompts.limit=2", "sampling.samples_per_prompt=4", "sampling.scheduler=ddim",
                   "sampling.num_inference_steps=10", "filter.min_clique=3", "index.shards=1",
                   "budget=fixed"], config_name="nightly")
    assert cfg.storage.options["secret"] == SECRET  # the real values still reach fsspec
    caplog.set_level(logging.INFO)
    try:
        res = nightly.run(cfg)
        nightly.announce(cfg, res)
        printed = nightly.format_result(res)
    finally:
        server.shutdown()
    assert [r["outcome"] for r in res.rows] == ["ok"], res.rows
    (path, body), = _Hook.received
    assert HOOK_TOKEN in path  # the real URL was posted to
    summary = json.loads(next((tmp_path / "runs").rglob("summary.json")).read_text())
    assert summary["config"]["storage"]["options"]["secret"] == MASK
    assert summary["config"]["nightly"]["webhook"] == f"http://127.0.0.1:{server.server_port}/***"
    n = assert_no_leak(tmp_path / "runs", texts=(body.decode(), printed, caplog.text, *capsys.readouterr()))
    assert n > 20 and next((tmp_path / "runs").rglob("report/index.html"))


@pytest.mark.slow  # trains (2 steps)
def test_training_info_holds_no_credential(tmp_path):
    """`memex train` writes its config beside the model: data.storage_options are redacted there."""
    from test_train import _cfg

    from memex.images import encode_png
    from memex.synth import logo
    from memex.training import INFO_FILE, train

    rows = [logo(i, 16) for i in range(4)]
    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.table({"id": [f"i{k}" for k in range(4)], "image": [encode_png(im) for im, _ in rows],
                             "caption": [c for _, c in rows]}), manifest)
    cfg = _cfg(manifest, tmp_path / "model", f"+data.storage_options.key={KEY_ID}",
               f"+data.storage_options.secret={SECRET}", "trainer.steps=2", "trainer.checkpoint_every=2")
    out = train(cfg)
    info = json.loads((out / INFO_FILE).read_text())
    assert info["config"]["data"]["storage_options"] == {"key": MASK, "secret": MASK}
    assert_no_leak(tmp_path / "model")
