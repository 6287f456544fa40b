"""Credentials that reached an output past memex/redact.py, each through the function or command path that
printed it: Hydra's "use +key=<the value>" for a plain override of a storage option the config lacks, a
custom webhook's URL in free text, a scheme-less webhook echoed by its refusal, a dotted config key judged
as a whole, an Azure connection string that starts with its endpoint URL, an escaped quote inside a quoted
value; and the prose that was masked, and the log file that did not say why the command failed."""

from __future__ import annotations

import logging
import sys

import pytest

from memex import cli
from memex import config as C
from memex import redact as R
from memex.redact import redact_text

SECRET = "wJalrFAKEsecretQ7Z"  # distinctive: found nowhere unless leaked
HOOK = "memexHOOKpath5e8d0a"


@pytest.fixture
def restore_logging():
    """main() sets up logging (basicConfig, the redacting record factory): left as it was for the next test."""
    root = logging.getLogger()
    factory, handlers, level = logging.getLogRecordFactory(), list(root.handlers), root.level
    yield
    logging.setLogRecordFactory(factory)
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(level)


def _main(monkeypatch, *args: str) -> int | None:
    monkeypatch.setattr(sys, "argv", ["memex", *args])
    try:
        cli.main()
    except SystemExit as e:
        return e.code
    return 0


@pytest.mark.parametrize(("stage", "key"), [("audit", "storage.options.secret"),
                                            ("train", "data.storage_options.secret")])
def test_a_plain_override_of_a_storage_option_the_config_lacks_is_refused_without_its_value(
        monkeypatch, capfd, restore_logging, stage, key):
    """No `+`: Hydra refused it with "To append to your config use +<key>=<the value>", written to stderr
    by Hydra itself, unredacted. memex refuses it first, naming +<key>, without the value."""
    code = _main(monkeypatch, stage, f"{key}={SECRET}")
    out, err = capfd.readouterr()
    assert code == 1
    assert SECRET not in out + err, out + err
    assert f"+{key}=" in err and err.startswith("memex: error: ")
    # a key the composed config has is still overridden without `+` (storage=s3's client_kwargs)
    cli.check_overrides(["storage=s3", "storage.options.client_kwargs.endpoint_url=http://127.0.0.1:9"],
                        C.AuditConfig)
    cli.check_overrides([f"+{key}={SECRET}"], cli.SCHEMAS[stage])


def test_a_plain_override_absent_from_one_option_of_a_sweep_is_refused():
    with pytest.raises(C.ConfigError) as e:
        cli.check_overrides(["-m", "storage=s3,local", f"storage.options.client_kwargs.endpoint_url=http://127.0.0.1:9/{SECRET}"],
                            C.AuditConfig)
    assert SECRET not in str(e.value) and "with storage=local" in str(e.value)
    assert "+storage.options.client_kwargs.endpoint_url=" in str(e.value)


@pytest.mark.parametrize(("text", "kept"), [
    (f"webhook: https://hooks.zapier.com/hooks/catch/123/{HOOK}/", "webhook: https://hooks.zapier.com/***"),
    (f"[launcher] #0 : nightly.webhook=https://example.com/hook/{HOOK}", "nightly.webhook=https://example.com/***"),
    (f"{{'webhook_url': 'https://example.com/x?a={HOOK}'}}", "'webhook_url': 'https://example.com/***'"),
])
def test_a_custom_webhook_url_after_its_name_keeps_only_its_host(text, kept):
    out = redact_text(text)
    assert HOOK not in out and kept in out, out
    assert redact_text(out) == out


def test_nightly_info_config_and_a_sweeps_errors_show_no_webhook_path(monkeypatch, capfd, restore_logging):
    url = f"https://hooks.zapier.com/hooks/catch/123/{HOOK}/"
    _main(monkeypatch, "nightly", "--info", "config", "nightly.location=/tmp/memex-no-such", f"nightly.webhook={url}")
    out, err = capfd.readouterr()
    assert "webhook: https://hooks.zapier.com/***" in out + err
    assert HOOK not in out + err
    # a sweep (no -m), and the sweep-failure summary's overrides
    with pytest.raises(C.ConfigError) as e:
        cli.check_overrides([f"nightly.webhook=https://example.com/hook/{HOOK},https://b.example.com/{HOOK}"],
                            C.NightlyAuditConfig)
    assert HOOK not in redact_text(str(e.value)) and "is a sweep" in str(e.value)
    assert R.redact_override(f"nightly.webhook=https://example.com/hook/{HOOK}") == "nightly.webhook=https://example.com/***"


def test_a_scheme_less_webhook_is_refused_without_its_value():
    cfg = cli.compose_config("nightly", ["nightly.location=/tmp/memex-no-such",
                                         f"nightly.webhook=hooks.slack.com/services/T0AAA/B0BBB/{HOOK}"])
    with pytest.raises(C.ConfigError) as e:
        cli.to_nightly_config(cfg)
    assert HOOK not in str(e.value) and "hooks.slack.com" in str(e.value)
    # an upper-case scheme is a URL too
    cfg = cli.compose_config("nightly", ["nightly.location=/tmp/memex-no-such",
                                         f"nightly.webhook=HTTPS://hooks.slack.com/services/{HOOK}"])
    assert cli.to_nightly_config(cfg).nightly.webhook.startswith("HTTPS://")


@pytest.mark.parametrize("text", [f"+storage.options.key={SECRET}", f"data.storage_options.key={SECRET}",
                                  f"could not set storage.options.key={SECRET} (retrying)"])
def test_a_dotted_key_whose_last_part_is_secret_is_masked(text):
    out = redact_text(text)
    assert SECRET not in out and ".key=***" in out, out
    assert redact_text("index_key=abc and hash.sort_key=1") == "index_key=abc and hash.sort_key=1"


@pytest.mark.parametrize("text", [
    f"BlobEndpoint=https://acct.blob.core.windows.net/;AccountName=acct;AccountKey={SECRET}==",
    f"BlobEndpoint=https://acct.blob.core.windows.net;AccountName=acct;AccountKey={SECRET}==",
    f"BlobEndpoint=https://acct.blob.core.windows.net/;SharedAccessSignature=sv=2022-11-02&sig={SECRET}",
])
def test_an_azure_connection_string_that_starts_with_its_endpoint_is_masked(text):
    out = redact_text(text)
    assert SECRET not in out, out
    assert out.startswith("BlobEndpoint=https://acct.blob.core.windows.net")  # where it goes stays readable
    assert "AccountKey=***" in out or "SharedAccessSignature=***" in out


def test_a_quoted_value_with_an_escaped_quote_and_an_override_with_a_space_are_masked_whole():
    out = redact_text(f"storage.options.secret='ab\\'cd{SECRET}'")
    assert SECRET not in out and out == "storage.options.secret='***'", out
    assert R.redact_override(f"storage.options.token=abc {SECRET}") == "storage.options.token=***"
    # URL-valued overrides that are no webhook's are kept whole, path included (only a webhook's is cut)
    for kept in ("storage.options.endpoint_url=http://127.0.0.1:9", "trainset.path=s3://bucket/laion/train.parquet",
                 "storage.options.endpoint_url=https://minio.example.org:9000/s3"):
        assert R.redact_override(kept) == kept


def test_memex_own_storage_hint_is_not_masked_as_a_credential():
    from memex.storage import store_failed

    text = store_failed("write", "s3://b/runs/x", PermissionError("denied"))
    assert "credentials: an expired token" in redact_text(text)
    assert redact_text(f"credentials: {SECRET}") == "credentials: ***"


def test_the_reason_a_command_failed_is_in_its_log_file(tmp_path, monkeypatch, capsys, restore_logging):
    from memex.storage import Store

    monkeypatch.setenv("MEMEX_LOG_DIR", str(tmp_path / "local-logs"))

    @cli._report_errors
    def _audit(cfg):
        from memex import console

        console.note_folder(Store(str(tmp_path / "run")))
        raise C.ConfigError(f"cannot write storage.options.secret={SECRET}: the reason")

    with pytest.raises(SystemExit):
        _audit(None)
    err = capsys.readouterr().err
    assert err.count("the reason") == 1 and SECRET not in err  # the console: once
    logs = list((tmp_path / "run" / "logs").glob("*.log"))
    assert len(logs) == 1
    text = logs[0].read_text()
    assert text.count("the reason") == 1 and "ERROR" in text and SECRET not in text
