"""memex/redact.py after review: an Azure URL's container is no credential (two training sets in two
containers hashed to the same nightly config), and the free-text scan is linear on long runs of `name:`
(every log record goes through it). No Ray here."""

from __future__ import annotations

import random
import re
from dataclasses import replace

import pytest

from memex import redact as R
from memex.redact import MASK, redact, redact_text, redact_url
from memex.stages.nightly import config_sha256

from conftest import compose

A = "abfs://laion-subset-a@acct.dfs.core.windows.net/train.parquet"
B = "abfs://laion-subset-b@acct.dfs.core.windows.net/train.parquet"


def test_an_azure_container_is_kept_so_two_training_sets_hash_apart():
    assert redact(A) == A and redact_text(f"trainset.path={B} missing") == f"trainset.path={B} missing"
    for scheme in ("abfs", "abfss", "az", "adl", "wasb", "wasbs"):
        url = f"{scheme}://cont-1@acct.blob.core.windows.net/x"
        assert redact_url(url) == url
    base = compose(["trainset.path=/data/train.parquet", "nightly.location=/ckpts"], config_name="nightly")
    a, b = (replace(base, trainset=replace(base.trainset, path=p)) for p in (A, B))
    assert config_sha256(a) != config_sha256(b)  # nightly took set B's checkpoints for audited against set A's


@pytest.mark.parametrize("url, expected", [
    ("abfs://c:pw@acct.dfs.core.windows.net/x", "abfs://***@acct.dfs.core.windows.net/x"),
    ("abfss://c%3Apw@acct.dfs.core.windows.net/x", "abfss://***@acct.dfs.core.windows.net/x"),
    ("wasbs://c:pa/ss@acct.blob.core.windows.net/x", "wasbs://***@acct.blob.core.windows.net/x"),
    ("wasbs://c@acct.blob.core.windows.net/x?sv=2020&sig=AbC", "wasbs://c@acct.blob.core.windows.net/x?sv=2020&sig=***"),
    ("https://ghp_token@github.com/o/r", "https://***@github.com/o/r"),  # other schemes: a user alone is a token
    ("s3://AKIA@bucket/x", "s3://***@bucket/x"),
])
def test_a_password_in_an_azure_url_and_a_user_elsewhere_are_still_masked(url, expected):
    assert redact_url(url) == expected and redact_text(f"path: {url}") == f"path: {expected}"
    assert redact(expected) == expected  # idempotent


# the scan before the fix, as the reference: one pattern for name, separator and value, and a URL pattern
# tried from every word boundary
_OLD_URL = re.compile(r"\b[A-Za-z][A-Za-z0-9+.\-]*://(?:[^\s'\"<>`?#;]|;(?![A-Za-z_][\w.\-]*=))+"
                      r"(?:[?#][^\s'\"<>`]*)?")
_OLD_ASSIGN = re.compile(r"""(?<![\w.\-/])(?P<name>[A-Za-z_][\w.\-]*)(?P<q>['"]?)(?P<sep>\s*[=:]\s*)"""
                         r"""(?:'(?P<sq>(?:\\.|[^'\\])*|[^']*)'|"(?P<dq>(?:\\.|[^"\\])*|[^"]*)"|(?P<open>['"])"""
                         r"""[^\s'"]*|(?P<bare>[^\s'",;})\]]+))""")


def _old_assignments(text: str) -> str:
    out, pos = [], 0
    while (m := _OLD_ASSIGN.search(text, pos)) is not None:
        bare = m.group("bare")
        if not R._secret_assignment(m.group("name")) or (
                bare is not None and ":" in m.group("sep") and R._PROSE.match(text, m.start("bare"))):
            out.append(text[pos:m.end("name")])
            pos = m.end("name")
            continue
        head = text[pos:m.start()] + m.group("name") + m.group("q") + m.group("sep")
        if m.group("open") is not None:
            out.append(f"{head}{m.group('open')}{MASK}")
            pos = m.end()
            continue
        quote = "'" if m.group("sq") is not None else '"' if m.group("dq") is not None else ""
        cred = R._CREDENTIAL.match(text, m.end()) if bare is not None and bare.lower() in R._AUTH_SCHEMES else None
        if cred:
            out.append(f"{head}{bare} {MASK}")
            pos = cred.end()
            continue
        out.append(f"{head}{quote}{MASK}{quote}")
        pos = m.end()
    out.append(text[pos:])
    return "".join(out)


def old_redact_text(text: str) -> str:
    pieces, last = [], 0
    for m in _OLD_URL.finditer(text):
        before = R._NAME_BEFORE.search(text[max(last, m.start() - 200):m.start()])
        hook = before is not None and any(w.startswith("webhook") for w in R.words(before.group("name")))
        pieces += [_old_assignments(text[last:m.start()]), redact_url(m.group(0), strict=hook)]
        last = m.end()
    pieces.append(_old_assignments(text[last:]))
    return "".join(pieces)


def old_redact_urls(text: str) -> str:
    return _OLD_URL.sub(lambda m: redact_url(m.group(0)), text) if "://" in text else text


CORPUS = [
    "storage.options={'key': 'AKIAXXXX', 'secret': 'SeCrEt/+abc', 'token': None}",
    'storage.options={"token": {"type": "service_account", "private_key": "-----BEGIN\\nMIIE\\n"}}',
    "storage.options.secret=abc def key=AKIA123 secret=abc AWS_SECRET_ACCESS_KEY=abc123",
    "headers={'Authorization': 'Bearer eyJhbGciOi'} Authorization=Bearer eyJhbGc Bearer: abc",
    "sftp://alice:p%40ss@host/runs https://alice:pa ss@host/x x.https://h/p _https://h/p 1.s3://b/k",
    "DefaultEndpointsProtocol=https;AccountName=acct;AccountKey=AbCd+/==;EndpointSuffix=core.windows.net",
    "BlobEndpoint=https://acct.blob.core.windows.net/;SharedAccessSignature=sv=2020&sig=abc",
    "https://acct.blob.core.windows.net/c/x?sv=2020&sig=AbC%2Bdef&se=2024#access_token=t",
    "storage.options.sas_token='?sv=2020&sig=abc' 'token': \"it's-secret\" password=\"p@ss word\"",
    "storage.options.password=p,ss storage.options.password=\"a\\\"b\" secret='a\\'b'",
    "nightly.webhook=https://hooks.slack.com/services/T/B/X webhook: 'https://example.com/hook/abc'",
    "credentials: an expired token; token: the end; client_secret: s3cr3t password : hunter2",
    "Error: token=x (key=,) key= ; 'key': ; token\t=\tabc X-Amz-Security-Token: FwoGZXIvYXdzE",
    "a:b:c:token=abc:d a=b=c=secret=1 https://u:p@h/x?token=1;key=2 see s3://b/k.",
    "memex audit storage.options.key=AK storage.options.secret=SS trainset.path=" + A,
]


def _random_strings(n: int, seed: int = 0) -> list[str]:
    pieces = ["token", "key", "a", "Error", "secret", "storage.options.key", "webhook", "Authorization", "Bearer",
              "an", "the", ":", "=", "'", '"', "\\", " ", ",", ";", "/", ".", "-", "_", "https://", "s3://", "://",
              "?", "#", "&", "@", "1", "é", "+", "}", ")", "]", "{", "\t", "sig=", "AccountKey=", "u:p@h", "<", "`"]
    rng = random.Random(seed)
    return ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 30))) for _ in range(n)]


def test_the_linear_scan_redacts_what_the_old_one_did():
    long = ["a:" * 1000 + "token=abc", "a." * 1000 + "https://u:p@h/x", "x-" * 1000 + ":// a.b-c.d://e f"]
    for text in CORPUS + long + _random_strings(3000):
        assert redact_text(text) == old_redact_text(text), text
        assert R.redact_urls(text) == old_redact_urls(text), text


class _Counted:
    """A compiled pattern that adds up how far its matches reach from where each call began."""

    def __init__(self, pattern: re.Pattern, tally: list[int]):
        self.pattern, self.tally = pattern, tally

    def search(self, string, pos=0, *rest):
        m = self.pattern.search(string, pos, *rest)
        self.tally[0] += m.end() - pos if m else 0
        return m

    def match(self, string, pos=0, *rest):
        m = self.pattern.match(string, pos, *rest)
        self.tally[0] += m.end() - pos if m else 0
        return m

    def finditer(self, string, *rest):
        for m in self.pattern.finditer(string, *rest):
            self.tally[0] += m.end() - m.start()
            yield m

    def __getattr__(self, name):
        return getattr(self.pattern, name)


def test_a_long_run_of_names_is_read_a_bounded_number_of_times(monkeypatch):
    # a:a:a:... (50K chars took 10 s): each name's value was read to the text's end, and the scan went on
    # right after the name. Counted: the characters the module's patterns' matches cover, all calls together
    tally = [0]
    for name, value in vars(R).items():
        if isinstance(value, re.Pattern):
            monkeypatch.setattr(R, name, _Counted(value, tally))
    text = "a:" * 25_000 + "token=abc"
    assert redact_text(text) == "a:" * 25_000 + f"token={MASK}"
    assert tally[0] < 10 * len(text)  # the old scan's matches covered ~25K * 25K chars
