"""Credentials never leave memex: what every output, log line and printout gets instead of the config.

The config memex runs with holds credentials (storage.options.key/secret/token for s3fs, gcsfs,
adlfs; a webhook URL that is itself a capability; a URL with user:password@). The stages pass the
real values to fsspec, and only outputs are redacted: <run>/summary.json, matches/_settings.json,
run.json, the index's info.json, the report, a trained model's memex_train.json, the nightly ledger
rows, the webhook payload, the console and log lines.

The rule (`redact(obj)` on nested dicts, lists and strings):

  1. A dict key is a *secret name* when, split into lower-case words at `_ - . ` and camelCase
     boundaries (`aws_secret_access_key` -> aws secret access key, `AccountKey` -> account key):
       * one word is `secret` (client_secret, aws_secret_access_key, secret_key);
       * or the last word is password, passwd, passphrase, pwd, token, credential(s), creds,
         apikey, accesskey, secretkey, privatekey, auth, authorization, cookie(s)
         (session_token, sas_token, db_password, Authorization; NOT tokenizer, max_tokens, token_count);
       * or the last word is `key` (or `key id`: aws_access_key_id) and it is the whole name
         (`key`: s3fs's access key id) or follows one of: access, secret, api, account, private, client,
         master, encryption, signing, session, sse, customer, storage, shared, subscription, service,
         app, auth, license (api_key, x-api-key, account_key, sse_customer_key; NOT index_key, hash_key,
         sort_key, prompt_id, keep, dup_k);
       * or it is a connection string (connection_string, conn_str: Azure's carry AccountKey=).
     Its value becomes "***" (a dict or list as a whole), except None, True/False and "" (they hold
     nothing, and `token: null` stays readable).
  2. A key with the word `webhook` (nightly.webhook) holds a capability URL: anyone who has it can
     post. Its value is cut to scheme://host/*** (the host says where the alarms go).
  3. Every other string has each URL in it redacted (`redact_url`):
       * user info: https://user:pass@host and https://<token>@host -> https://***@host (the user part
         alone is masked too: tokens are passed as the user name, e.g. GitHub's and Sentry's; a password
         with a raw "/", "?" or "#" too, except digits then "/", which is host:port/path); except an Azure
         URL's container (abfs, abfss, az, adl, wasb, wasbs: abfs://<container>@<account>.dfs.core.windows.net/),
         kept when no password follows it (abfs://c:<password>@... -> abfs://***@...);
       * query and fragment parameters with a secret name (rule 1) or named sig, signature, code,
         hmac: ?token=, ?key=, ?sig= (Azure SAS), X-Amz-Signature / X-Amz-Credential /
         X-Amz-Security-Token (S3 presigned), X-Goog-Signature, ?code= (Azure Functions),
         #access_token= -> name=*** (other parameters, e.g. Azure's sv/se/sp, stay);
       * the path of known webhook services, where the secret is the path: hooks.slack.com/services/***,
         discord(app).com/api/webhooks/***, *.webhook.office.com/<kind>/***.
  Numbers, enums as values, paths without a scheme and the non-secret names above are never touched:
  redacting a setting that is not secret hides what a run did, which is a bug too.

`redact_text` is for free text (error messages, log lines, printouts): rule 3, plus `name=value`,
`name: value` and `'name': 'value'` with a secret name (rule 1; for a dotted name, the whole or its last
part: storage.options.key) -> name=*** (storage.options.secret=..., a dict's repr in an exception; a quoted
value up to its closing quote, \' inside it included; a bare one up to a space, quote, `,` `;` or bracket);
a URL right after a name with the word webhook (nightly.webhook=https://..., `webhook: https://...`) as
rule 2 (scheme://host/***); `Authorization: Bearer <token>` -> Authorization: Bearer *** (the credential
after an auth scheme word: Bearer, Basic, Token, Digest, Negotiate, ApiKey). A URL ends before `;Name=`
(an Azure connection string's next field: BlobEndpoint=https://...;AccountKey=...). Prose is left alone
where the value is an article and a word (`credentials: an expired token`). `redact_override` is for one
command-line override, whose value is all that follows the first `=`, spaces included.

Why a constant "***" and not a fingerprint: settings written to a folder (run.json, _settings.json)
are compared with a rerun's, and credentials never change a result, so a rotated key must still
resume the same run; a fingerprint would refuse it, and would tell a reader whether two runs used
the same (possibly low-entropy, brute-forceable) secret. The same holds for the hashes memex names
run folders and nightly configs by: they are taken over the redacted settings, so a config without
credentials hashes exactly as before (but for an Azure URL's container: masked as a credential
before, a config naming one hashed anew once). redact(redact(x)) == redact(x).

Not covered (Hydra's, Ray's and the shell's outputs, not memex's): `--cfg job` prints the config as
typed, `-m` (multirun) saves Hydra's multirun.yaml with the raw overrides, Hydra's own override parse
errors quote the override, `ray job submit` keeps the entrypoint's arguments, and a command line is
visible in `ps` and shell history. (conf/memex_hydra.yaml sets hydra.output_subdir=null, so a normal
run writes no .hydra/config.yaml.) Pass credentials through the environment (AWS_ACCESS_KEY_ID, ...,
the provider's credential chain) where those matter. Data is not config: training image URIs in the
index's train.parquet and prompt texts are stored as given.
"""

from __future__ import annotations

import logging
import re
from typing import Any
from urllib.parse import unquote, urlsplit

MASK = "***"

_SECRET_LAST = frozenset({"password", "passwd", "passphrase", "pwd", "token", "credential", "credentials", "creds",
                          "apikey", "accesskey", "secretkey", "privatekey", "auth", "authorization", "cookie",
                          "cookies"})
_KEY_QUALIFIERS = frozenset({"access", "secret", "api", "account", "private", "client", "master", "encryption",
                             "signing", "session", "sse", "customer", "storage", "shared", "subscription", "service",
                             "app", "auth", "license"})
_CONNECTION_STRINGS = frozenset({("connection", "string"), ("conn", "str"), ("connectionstring",)})
_CONTAINER_SCHEMES = frozenset({"abfs", "abfss", "az", "adl", "wasb", "wasbs"})  # user part = container (adlfs)
_URL_PARAMS = frozenset({"sig", "signature", "code", "hmac"})  # secret as URL parameters only
# host (exact, or a suffix when it starts with ".") -> path segments kept before the secret part
_HOOK_HOSTS = {"hooks.slack.com": 1, "discord.com": 2, "discordapp.com": 2, "ptb.discord.com": 2,
               "canary.discord.com": 2, ".webhook.office.com": 1, "outlook.office.com": 1,
               "outlook.office365.com": 1}

_WORDS = re.compile(r"[A-Z]+(?=[A-Z][a-z]|\d|\b|_|$)|[A-Z]?[a-z]+|[A-Z]+|\d+")
# A URL ends at whitespace, a quote or a bracket; before its query, also at `;Name=`: the next field of an
# Azure connection string (BlobEndpoint=https://acct.blob.core.windows.net/;AccountKey=...), which the text
# rules then read as an assignment (a `;` in the query is a parameter separator, `_params`).
# The URL is the group `url`, from the first letter after a word boundary in a run of scheme characters. The
# match starts at the run's start, whose lookahead reads the run once and rejects it unless `://` and a URL
# character end it: `\b[A-Za-z][A-Za-z0-9+.\-]*://` alone was tried again from each `.` or `-` of a run, each
# time to its end (a 50K-char a.a.a... took 3 s, and every log record goes through here)
_URL_CHAR = r"""(?:[^\s'"<>`?#;]|;(?![A-Za-z_][\w.\-]*=))"""
_URL = re.compile(r"(?<![A-Za-z0-9+.\-])(?=[A-Za-z0-9+.\-]*://" + _URL_CHAR + r")[A-Za-z0-9+.\-]*?"
                  r"(?P<url>\b[A-Za-z][A-Za-z0-9+.\-]*://" + _URL_CHAR + r"""+(?:[?#][^\s'"<>`]*)?)""")
# Authorization: <scheme> <credential>: the word after one of these is masked too
_AUTH_SCHEMES = frozenset({"bearer", "basic", "token", "digest", "negotiate", "apikey"})
# the word after the scheme, quoted pieces included (Rails' `Token token="<secret>"`): _VALUE's bare value
_CREDENTIAL = re.compile(r"""[ \t]+(?:"[^"]*"|'[^']*'|[^\s'",;}&)\]])+""")
# name and separator (_HEAD), then, for a secret name only, its value (_VALUE): quoted (a backslash-escaped
# quote inside, as Hydra's grammar and Python's repr write it: 'ab\\'cd'; else up to the next quote; a quote
# never closed: up to the next space) or bare (up to a space, quote, `,`, `;` or closing bracket: a SAS's
# `sv=...&sig=...` is one value). Not one pattern: each name's bare value ran to the text's end on a run like
# a:a:a:... (no space, quote or comma) and the search went on right after the name, quadratic (50K chars: 10 s)
_HEAD = re.compile(r"""(?<![\w.\-/])(?P<name>[A-Za-z_][\w.\-]*)(?P<q>['"]?)(?P<sep>\s*[=:]\s*)""")
_VALUE = re.compile(r"""'(?P<sq>(?:\\.|[^'\\])*|[^']*)'|"(?P<dq>(?:\\.|[^"\\])*|[^"]*)"|(?P<open>['"])[^\s'"]*"""
                    r"""|(?P<bare>[^\s'",;})\]]+)""")
# a webhook's URL after its name (nightly.webhook=https://..., `webhook: https://...` in YAML): the URL is the
# capability, so only scheme://host/*** is kept, as rule 2 does for a dict
_NAME_BEFORE = re.compile(r"""(?<![\w.\-/])(?P<name>[A-Za-z_][\w.\-]*)['"]?\s*[=:]\s*[\['"]?$""")
# `credentials: an expired token`: prose, not a credential (an article, then another word)
_PROSE = re.compile(r"(?:an?|the)[ \t]+[A-Za-z]")


def words(name: str) -> list[str]:
    """`aws_secret_access_key` -> [aws, secret, access, key]; `AccountKey` -> [account, key]."""
    return [w.lower() for part in re.split(r"[^A-Za-z0-9]+", name) for w in _WORDS.findall(part)]


def is_secret_name(name: str) -> bool:
    """Rule 1 of the module doc: does a key (or URL parameter) with this name hold a credential?"""
    w = words(name)
    if not w:
        return False
    if "secret" in w or w[-1] in _SECRET_LAST or {tuple(w[-2:]), (w[-1],)} & _CONNECTION_STRINGS \
            or w[-2:] == ["access", "signature"]:  # an Azure connection string's SharedAccessSignature=sv=..&sig=..
        return True
    i = len(w) - 2 if len(w) >= 2 and w[-1] == "id" and w[-2] == "key" else len(w) - 1
    return w[i] == "key" and (i == 0 or w[i - 1] in _KEY_QUALIFIERS)


def _secret_param(name: str) -> bool:
    name = unquote(name)
    return is_secret_name(name) or (bool(words(name)) and words(name)[-1] in _URL_PARAMS)


def _params(part: str) -> str:
    """a=1&token=x -> a=1&token=***; a part without '=' (a plain #anchor) is kept."""
    if "=" not in part:
        return part
    out = []
    for item in re.split(r"([&;])", part):  # `;` separates parameters too (a=1;token=x)
        name, eq, value = item.partition("=")
        out.append(f"{name}={MASK}" if eq and value and _secret_param(name) else item)
    return "".join(out)


def _hook_segments(host: str) -> int | None:
    host = host.lower()
    for h, keep in _HOOK_HOSTS.items():
        if host == h or (h.startswith(".") and host.endswith(h)):
            return keep
    return None


def _valid_port(p) -> bool:
    try:
        p.port
    except ValueError:
        return False
    return True


def redact_url(url: str, strict: bool = False) -> str:
    """One URL with its credentials masked (rule 3); `strict` (a webhook): only scheme://host/*** is kept."""
    try:
        p = urlsplit(url)
    except ValueError:  # not a URL after all (e.g. an unbalanced IPv6 bracket)
        return url
    netloc = p.netloc
    # a raw "/", "?" or "#" in the password cuts the netloc short: u:pa/ss@host. When what is left looks
    # like host:port (u:1234#ab@host), only "#" or "?" right after it tells: a "/" there starts a path,
    # which may hold an "@" (host:8080/@scope/pkg)
    cut = url[len(p.scheme) + 3 + len(netloc):][:1]
    if "@" not in netloc and "@" in url and (not _valid_port(p) or (":" in netloc and cut in ("#", "?"))):
        at = url.find("@", len(p.scheme) + 3)
        return redact_url(f"{p.scheme}://{MASK}@{url[at + 1:]}", strict)
    if "@" in netloc:
        user, host = netloc.rsplit("@", 1)
        # Azure's user part is the container: masked, two training sets in two containers read the same,
        # and a nightly job took the second's checkpoints for audited (the same config_sha256). Kept since
        # this release, so the nightly config hash (and run folder name) of such a setting changes once:
        # its series is audited again from its first checkpoint
        if p.scheme.lower() not in _CONTAINER_SCHEMES or ":" in unquote(user):
            netloc = MASK + "@" + host
    if strict:
        return _unsplit(p.scheme, netloc, "/" + MASK if p.path.strip("/") or p.query or p.fragment else p.path,
                        "", "")
    path = p.path
    keep = _hook_segments(p.hostname or "")
    if keep is not None:
        segs = path.lstrip("/").split("/")
        if len(segs) > keep and any(segs[keep:]):
            path = "/" + "/".join([*segs[:keep], MASK])
    return _unsplit(p.scheme, netloc, path, _params(p.query), _params(p.fragment))


def _unsplit(scheme: str, netloc: str, path: str, query: str, fragment: str) -> str:
    """urlunsplit, but `scheme://` kept when the host is empty: urllib writes memory:///r/run as
    memory:/r/run (only schemes it knows keep the //), a path that then named a local folder."""
    return (f"{scheme}://{netloc}{path}" + (f"?{query}" if query else "") + (f"#{fragment}" if fragment else ""))


def redact_urls(text: str) -> str:
    """Every URL in `text` through `redact_url`; the rest of the text unchanged."""
    if "://" not in text:
        return text
    return _URL.sub(lambda m: text[m.start():m.start("url")] + redact_url(m.group("url")), text)


def _secret_assignment(name: str) -> bool:
    """A name in free text holds a credential: as a whole, or its last dotted part (a config key:
    storage.options.key, data.storage_options.key, whose whole name ends in `options key`)."""
    return is_secret_name(name) or ("." in name and is_secret_name(name.rsplit(".", 1)[1]))


def _assignments(text: str) -> str:
    """`name=value`, `name: value`, `'name': 'value'` with a secret name -> the value masked."""
    out, pos = [], 0
    while (h := _HEAD.search(text, pos)) is not None:
        # a name without a value after it (`key=,`) is no assignment; a name that is not secret neither:
        # go on right after the name (`Error: token=x` has one), without reading its value
        m = _VALUE.match(text, h.end()) if _secret_assignment(h.group("name")) else None
        bare = m.group("bare") if m else None
        if m is None or (bare is not None and ":" in h.group("sep") and _PROSE.match(text, m.start("bare"))):
            out.append(text[pos:h.end("name")])  # (prose: `credentials: an expired token`)
            pos = h.end("name")
            continue
        head = text[pos:h.end()]
        if m.group("open") is not None:  # a quote never closed: the word after it
            out.append(f"{head}{m.group('open')}{MASK}")
            pos = m.end()
            continue
        quote = "'" if m.group("sq") is not None else '"' if m.group("dq") is not None else ""
        cred = _CREDENTIAL.match(text, m.end()) if bare is not None and bare.lower() in _AUTH_SCHEMES else None
        if cred:
            # `Authorization: Bearer <token>`: the scheme is no secret, the word after it is
            out.append(f"{head}{bare} {MASK}")
            pos = cred.end()
            continue
        out.append(f"{head}{quote}{MASK}{quote}")
        pos = m.end()
    out.append(text[pos:])
    return "".join(out)


def redact_text(text: str) -> str:
    """Free text (a message, a log line): URLs (rule 3) and secret-named assignments masked."""
    if not isinstance(text, str):
        text = str(text)
    pieces, last = [], 0
    for m in _URL.finditer(text) if "://" in text else ():  # assignments outside URLs; a URL's own
        start = m.start("url")  # parameters are rule 3's
        before = _NAME_BEFORE.search(text[max(last, start - 200):start])
        hook = before is not None and any(w.startswith("webhook") for w in words(before.group("name")))
        pieces += [_assignments(text[last:start]), redact_url(m.group("url"), strict=hook)]
        last = m.end()
    pieces.append(_assignments(text[last:]))
    return "".join(pieces)


def redact_override(text: str) -> str:
    """One command-line override, `[+|++|~]key=value`, redacted: its value is everything after the first `=`
    (Hydra reads `key=abc def` as one value, where `redact_text` would stop at the space), masked whole when
    the key's name (or its last dotted part) is secret, cut to scheme://host/*** for a webhook's; any other
    override through `redact_text`."""
    key, eq, value = text.partition("=")
    name = key.lstrip("+~")
    if eq and value not in ("", "null") and _secret_assignment(name):
        return f"{key}={MASK}"
    if eq and any(w.startswith("webhook") for w in words(name)) and "://" in value:
        url = value.strip("'\"")
        return f"{key}={redact_url(url, strict=True)}"
    return redact_text(text)


def _mask(value: Any) -> Any:
    return value if value is None or isinstance(value, bool) or value == "" else MASK


def redact(obj: Any) -> Any:
    """A copy of JSON-like `obj` (dicts, lists, tuples, strings, scalars) with every credential masked
    by the rules of the module doc; anything else is returned as it is. Never changes `obj`."""
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            name = str(k)
            if is_secret_name(name):
                out[k] = _mask(v)
            elif "webhook" in words(name) and isinstance(v, str) and "://" in v:
                out[k] = redact_url(v, strict=True)
            else:
                out[k] = redact(v)
        return out
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact(v) for v in obj)
    if isinstance(obj, str):
        return redact_urls(obj)
    return obj


_INSTALLED = "_memex_redacts"


def install_log_redaction() -> None:
    """Redact every log record of this process as it is made (message, arguments and traceback),
    whatever handlers Hydra or Ray configure later. Idempotent."""
    old = logging.getLogRecordFactory()
    if getattr(old, _INSTALLED, False):
        return

    def factory(*args, **kwargs) -> logging.LogRecord:
        record = old(*args, **kwargs)
        try:
            msg = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string is logging's to report, not ours
            return record
        clean = redact_text(msg)
        if clean != msg:
            record.msg, record.args = clean, ()
        if record.exc_info and record.exc_info[0] is not None:
            record.exc_text = redact_text(logging.Formatter().formatException(record.exc_info))
        return record

    setattr(factory, _INSTALLED, True)
    logging.setLogRecordFactory(factory)
