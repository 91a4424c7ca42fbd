"""The secret scan of a commit: its memory image and the disk data its organisation wrote, for private keys,
cloud credentials, provider tokens, `.env`-style secret assignments and our own `vers_` API keys.

Rules. The provider rules are taken at import time from detect-secrets (Yelp), the most used and maintained
Python rule set: the regular expressions of its regex plugins, so a new release's fixes reach us and change
`RULES_VERSION`. Only its plugins whose patterns start from a distinctive literal are used (AWS, GitHub,
GitLab, Slack, Stripe, OpenAI, PyPI, npm, SendGrid, Square, Azure storage). Left out, because on raw disk
blocks and memory pages they report noise rather than secrets: the high-entropy string detectors (compressed
data, keys of every package signature and random pages are all high entropy), the keyword detector (every
`password = ...` in source code and documentation), and the plugins whose pattern is a short prefix and a run
of letters (Artifactory, Twilio, Mailchimp, Telegram, Discord: random bytes and base64 blobs match them), JSON
web tokens and URL credentials (examples in documentation), public IP addresses (not secrets). Our own rules
add what detect-secrets misses or matches too loosely: PEM/OpenSSH/PuTTY private keys only with a key body
after the header (the headers alone are string constants of every SSL and SSH binary), AWS secret keys in
assignments without quotes, the newer GitHub, OpenAI, Anthropic, npm and Google token formats, `.env`-style
assignments of `*_SECRET`/`*_TOKEN`/`*_PASSWORD`/`*_API_KEY` names to a literal that is not a variable, a
format directive or a placeholder, and `vers_` keys.

The organisation's own values. The platform writes an org's environment variables (envvars.py) into every new
root VM's /etc/environment and into every exec, so a commit holds them in plain text whatever their format
(`DATABASE_URL=postgres://u:pw@host` matches no rule above). A scan is given the owning org's current values
and looks for each as a literal (rule `org-env-var`), first in order so that one named by a provider rule too
is reported as the org's variable. Their Hyperscan database is compiled for that scan with the rules; a scan
without values uses the rules' own, compiled once per process. A scan's result is kept under `scan_version`:
the rules' version and a keyed digest of the values looked for, so a change of the variables scans again.

Speed. A memory image and a disk's written data are a gigabyte or more of binary data, scanned as bytes, not
lines. Every rule is compiled into one Hyperscan database (Intel's multi-pattern regex engine, several GB/s per
core) in prefilter mode, which may report more than the rule matches but never less; each reported end
offset is then confirmed by the rule's Python regex in a window around it. Hyperscan releases the GIL while it
scans, and the work runs in threads (one per core), so the event loop keeps running.

Disk. Only the data the organisation wrote is scanned: `qemu-img map` on the top layer tells which guest
extents live in one of the commit's layers (not in the image's base disk), and their bytes are read straight
from that layer file. A finding's guest offset is named by e2fsprogs' `debugfs` (block -> inode -> path) on a
raw copy of the whole disk (the guest disk is a bare ext4 filesystem, no partition table), made only when
there is a disk finding.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import errno
import fnmatch
import hashlib
import hmac
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

import hyperscan
from detect_secrets.plugins.aws import AWSKeyDetector
from detect_secrets.plugins.azure_storage_key import AzureStorageKeyDetector
from detect_secrets.plugins.github_token import GitHubTokenDetector
from detect_secrets.plugins.gitlab_token import GitLabTokenDetector
from detect_secrets.plugins.npm import NpmDetector
from detect_secrets.plugins.openai import OpenAIDetector
from detect_secrets.plugins.pypi_token import PypiTokenDetector
from detect_secrets.plugins.sendgrid import SendGridDetector
from detect_secrets.plugins.slack import SlackDetector
from detect_secrets.plugins.square_oauth import SquareOAuthDetector
from detect_secrets.plugins.stripe import StripeDetector

# Disk bytes no file holds on the disk: a deleted file's, or a file's the guest has not synced yet (its
# page cache holds the name; `sync` in the guest before the commit names it).
FREE_SPACE = "(free space)"
# A disk finding whose file could not be named: no room on the host for the raw view the names come from.
UNNAMED = "(not named: no room to read the file system)"
# The scan's working folder next to the layers (removed by the scan, and at start-up if a crash left one).
WORKSPACE_PREFIX = ".secret-scan-"
# Disk the raw view leaves free at least.
WORKSPACE_RESERVE = 1 << 30
CHUNK = 16 << 20
# Longest stretch a rule's match may span before the offset Hyperscan reports (an env value of 200
# characters behind a long name, a GitLab agent token of 1 KiB); also the overlap between chunks.
REACH = 2048
EXCERPT_CONTEXT = 40
# Where a file's or a buffer's text may start with no separator before it: at each disk block (1 KiB on
# the images' small ext4 filesystems, 4 KiB on larger ones) and memory page.
DISK_BOUNDARY, MEMORY_BOUNDARY = 1024, 4096
HOLE_READ = 1 << 20
# Bounds that keep a guest full of token-shaped text from costing more than a normal scan: offsets Hyperscan
# reports in one chunk before the chunk's scan stops, and hits each worker confirms before it stops. A scan
# that reaches a bound still reports what it found (so publishing is still refused), only not all of it.
MAX_ENDS_PER_CHUNK = 20_000
MAX_HITS_PER_WORKER = 500
# Findings a commit's scan reports at most (the first by place).
MAX_FINDINGS = 1000
# Threads of their own, so a scan never holds the threads the rest of the orchestrator hands work to.
SCAN_THREADS = max(1, min(os.cpu_count() or 1, 4))
_EXECUTOR = ThreadPoolExecutor(max_workers=SCAN_THREADS, thread_name_prefix="secret-scan")


@dataclass(frozen=True)
class Finding:
    where: str  # "disk" or "memory"
    path: str  # disk: the guest file holding the bytes, FREE_SPACE if none does; memory: ""
    offset: int  # byte offset on the guest disk, or in the memory file
    rule: str
    excerpt: str  # the match redacted: its first few characters, then '*'


@dataclass(frozen=True)
class Rule:
    name: str
    pattern: bytes
    caseless: bool = False
    secret: tuple[int | str, ...] = (0,)  # the group holding the secret itself, the first that matched (the
    # rest of the match is context, such as a variable's name)
    accept: Callable[[re.Match[bytes]], bool] | None = None
    # What Hyperscan looks for, when the pattern is too costly for it: the match's start, ending where the
    # regex is then run on, `after` bytes past it at most.
    scout: bytes = b""
    after: int = 64
    regex: re.Pattern[bytes] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "regex", re.compile(self.pattern, re.IGNORECASE if self.caseless else 0))


# Token rules must not start in the middle of a longer word (a base64 blob holds any short prefix).
_LEFT = rb"(?<![A-Za-z0-9_+-])"


def _detect_secrets(name: str, detector: type, *, first: int = 0, count: int | None = None) -> list[Rule]:
    patterns = list(detector().denylist)[first : None if count is None else first + count]
    return [Rule(name, _LEFT + b"(?:" + p.pattern.encode() + b")", caseless=bool(p.flags & re.IGNORECASE)) for p in patterns]


_PLACEHOLDER = re.compile(
    rb"^(?:\$|%|@|\*|\.\.\.|your[_-])|\$\{|\{\{|%s|%d|%\(|<|>|xxxx|\*\*\*|change_?me|example|placeholder|redacted|dummy",
    re.IGNORECASE,
)


def _literal_secret(match: re.Match[bytes]) -> bool:
    """An assignment of a real value: not a placeholder, a variable or a format, not one repeated character
    or a number, and a name written in one case (UPPER_SNAKE or lower_snake, as configuration is). A value
    of letters in one case only reads as a word or a setting (`token=machine-id`, `password=password`)."""
    name, value = match.group("name"), match.group("value") or match.group("quoted")
    if not (name.isupper() or name.islower()) or _PLACEHOLDER.search(value):
        return False
    if len(set(value)) < 5 or value.isdigit():  # a run of one character, a number (a port, a time)
        return False
    return any(c in b"0123456789" for c in value) or (value.lower() != value and value.upper() != value)


# Private keys published in widely shipped software, by the SHA-256 of their first 64 body characters: the
# FIPS self-test keys compiled into GnuTLS (libgnutls.so.30, in every image with git's HTTPS transport).
PUBLISHED_KEYS = frozenset({
    "c471252232a6e68f793ca59626059f9f33e390b628ab8a8e0188aec275b7fe47",
    "8f642f0351e1761dd3f7d8934a2da0a5eacd7f8a2c0440d8e2bf58ff2a6e847d",
    "8dd51545b81e4a0a285630cfc608921c2523171d5cf57a8123116658baa84558",
    "c50f38f5a25dad1abc4c3162635f014f05e857ae7e6b590f66b42793e27f9d37",
    "4b86104d3a39ae361925614ff33350c34aa8370b85a3b2e79ee407705a0af571",
    "36d32468a4353827c6db9a9477736adf7bb980c50854d0b57257f5132ef32d39",
    "e36ff64abc8431d1295824c32f55327df2af968b417a4073cc696a2332d3c370",
    "d76d8725f92d87288e0466d850892bf8dd7f487ad21d40f211612ebec68852a2",
})  # fmt: skip


def _keyed_body(match: re.Match[bytes]) -> bool:
    """A PEM body (base64, not a header or a message after the banner) of a key nobody has published."""
    start = re.sub(rb"\s", b"", match.group("body"))[:64]
    return len(set(start)) > 16 and hashlib.sha256(start).hexdigest() not in PUBLISHED_KEYS


# A name that ends in one of these words (DB_PASSWORD, SECRET_KEY, STRIPE_API_KEY), not one that merely holds
# it (PASSWORD_EXPIRY, TOKEN_URL, SECRET_NAME name no secret).
_ENV_NAME = rb"(?:SECRET|SECRET_?KEY|TOKEN|PASSWORD|PASSWD|API_?KEY|ACCESS_?KEY|PRIVATE_?KEY|AUTH_?KEY)"
_VALUE_CHARS = rb"[^\x00-\x20\x7f-\xff'\"$`\\;,&(){}<>\[\]]"  # no &: a URL's query string is no assignment
_VALUE_END = rb"(?=[\x00-\x20\x7f-\xff'\"]|\Z)"

_PEM = (
    rb"-----BEGIN (?:RSA |DSA |EC |OPENSSH |ENCRYPTED |PGP |SSH2 ENCRYPTED )?PRIVATE KEY(?: BLOCK)?-----\r?\n"
    rb"(?:[A-Za-z-]+: [^\r\n]{1,200}\r?\n)*\r?\n?"
)
_PUTTY = rb"PuTTY-User-Key-File-[23]: [a-z0-9-]+\r?\nEncryption: [a-z0-9-]+\r?\n(?:[A-Za-z-]+: [^\r\n]{1,200}\r?\n){1,4}"
# The key's body, whole (its first 64 characters are the same in every OpenSSH key of one type).
_KEY_BODY = rb"(?P<body>[A-Za-z0-9+/=]{64}[A-Za-z0-9+/=\r\n]{0,8192})"

_OURS_FIRST = [
    Rule("private-key", _PEM + _KEY_BODY, secret=("body",), accept=_keyed_body, scout=_PEM + rb"[A-Za-z0-9+/=]{64}", after=8192),
    Rule("private-key", _PUTTY + _KEY_BODY, secret=("body",), accept=_keyed_body, scout=_PUTTY + rb"[A-Za-z0-9+/=]{64}", after=8192),
    Rule("aws-access-key-id", rb"(?<![A-Za-z0-9])(?:A3T[A-Z0-9]|ABIA|ACCA|AKIA|ASIA)[0-9A-Z]{16}(?![A-Za-z0-9])"),
    Rule(
        "aws-secret-access-key",
        rb"aws_?secret_?(?:access_?)?key[\"']?[ \t]*[=:][ \t]*[\"']?([A-Za-z0-9/+]{40})(?![A-Za-z0-9/+=])",
        caseless=True,
        secret=(1,),
    ),
]
_LIBRARY = [
    *_detect_secrets("aws-secret-access-key", AWSKeyDetector, first=1),
    *_detect_secrets("github-token", GitHubTokenDetector),
    *_detect_secrets("gitlab-token", GitLabTokenDetector),
    *_detect_secrets("slack-token", SlackDetector),
    *_detect_secrets("stripe-key", StripeDetector),
    *_detect_secrets("openai-api-key", OpenAIDetector),
    *_detect_secrets("pypi-token", PypiTokenDetector),
    *_detect_secrets("npm-token", NpmDetector),
    *_detect_secrets("sendgrid-api-key", SendGridDetector),
    *_detect_secrets("square-oauth-secret", SquareOAuthDetector),
    *_detect_secrets("azure-storage-key", AzureStorageKeyDetector),
]
_OURS_LAST = [
    Rule("github-token", _LEFT + rb"github_pat_[A-Za-z0-9_]{82}"),
    Rule("openai-api-key", _LEFT + rb"sk-(?:proj|svcacct|admin)-[A-Za-z0-9_-]{40,}"),
    Rule("anthropic-api-key", _LEFT + rb"sk-ant-[a-z]{3,8}\d{0,3}-[A-Za-z0-9_-]{40,}"),
    Rule("npm-token", _LEFT + rb"npm_[A-Za-z0-9]{36}(?![A-Za-z0-9])"),
    Rule("google-api-key", _LEFT + rb"AIza[0-9A-Za-z_-]{35}(?![A-Za-z0-9_-])"),
    Rule("vers-api-key", rb"(?<![A-Za-z0-9_-])vers_[A-Za-z0-9_-]{43}(?![A-Za-z0-9_-])"),
    # .env-style assignments; the most general rule comes last, so a provider rule names a secret first.
    Rule(
        "env-secret",
        rb"(?:^|(?<=[\x00\r\n \t\"';]))(?:export[ \t]+)?(?P<name>[A-Za-z0-9_]*" + _ENV_NAME + rb")"
        rb"(?:=(?P<value>" + _VALUE_CHARS + rb"{8,200})" + _VALUE_END + rb"|"
        rb"[ \t]*=[ \t]*(?P<quote>['\"])(?P<quoted>" + _VALUE_CHARS + rb"{8,200})(?P=quote))",
        caseless=True,
        secret=("value", "quoted"),
        accept=_literal_secret,
    ),
]
RULES: list[Rule] = _OURS_FIRST + _LIBRARY + _OURS_LAST


def _secret_span(rule: Rule, match: re.Match[bytes]) -> tuple[int, int]:
    return next(match.span(g) for g in rule.secret if match.group(g) is not None)


RULES_VERSION = "detect-secrets-{}+hyperscan-{}+{}".format(
    version("detect-secrets"),
    version("hyperscan"),
    hashlib.sha256(
        json.dumps(
            [
                [[r.name, r.pattern.decode("latin-1"), r.scout.decode("latin-1"), r.caseless, list(r.secret)] for r in RULES],
                sorted(PUBLISHED_KEYS),
            ]
        ).encode()
    ).hexdigest()[:12],
)


# The org's variables (see the module's docstring). Values shorter than this name nothing worth refusing a
# publish for (1, true, 8080, a region are in every guest's memory anyway).
LITERAL_RULE = "org-env-var"
MIN_LITERAL_BYTES = 8
# What is looked for of a value: its first bytes. They identify a long value (a PEM key or a JSON credential
# in a variable, up to envvars.MAX_VALUE_CHARS) as well as the whole would, and a match must fit in the
# window of REACH bytes it is confirmed in.
LITERAL_BYTES = 256
# A value of letters in one case without a digit, with at most the punctuation of paths and URLs
# (production, /usr/local/bin, https://api.example.com), is configuration: every process the VM runs holds
# it, and looking for it would refuse every publish of an org that sets NODE_ENV. Looked for only under a
# name that says it is a secret.
_PLAIN_VALUE = re.compile(rb"[a-z./:,_-]+|[A-Z./:,_-]+")
_SECRET_NAME = re.compile(r"SECRET|TOKEN|PASS|PWD|KEY|AUTH|CRED|PRIVATE|SALT|SIGN|DSN|CERT", re.IGNORECASE)


def org_literals(variables: Mapping[str, str]) -> list[bytes]:
    """What a scan looks for of an org's environment variables (name -> value): the first LITERAL_BYTES
    bytes of each value of MIN_LITERAL_BYTES or more that is not plain configuration; sorted, each once."""
    found = set()
    for name, value in variables.items():
        raw = value.encode()
        if len(raw) < MIN_LITERAL_BYTES or (_PLAIN_VALUE.fullmatch(raw) and not _SECRET_NAME.search(name)):
            continue
        found.add(raw[:LITERAL_BYTES])
    return sorted(found)


def scan_version(literals: Sequence[bytes], key: bytes) -> str:
    """The version a commit's scan with these literals is kept under: RULES_VERSION, and with literals an
    HMAC of the whole set under the platform's secret `key`. The record of a scan tells nothing of the
    values, even short ones, to one who reads the database without the key; another set scans again."""
    if not literals:
        return RULES_VERSION
    digest = hmac.new(key, b"\x00".join(sorted(set(literals))), hashlib.sha256).hexdigest()[:16]  # values hold no NUL
    return f"{RULES_VERSION}+{LITERAL_RULE}-{digest}"


def _literal_rules(literals: Sequence[bytes]) -> list[Rule]:
    # every byte escaped for Hyperscan: a value may hold anything but NUL, which no expression can carry
    return [Rule(LITERAL_RULE, re.escape(value), scout=b"".join(b"\\x%02x" % c for c in value), after=0) for value in literals]


def _compile(rules: Sequence[Rule]) -> hyperscan.Database:
    database = hyperscan.Database()
    flags = [hyperscan.HS_FLAG_PREFILTER | (hyperscan.HS_FLAG_CASELESS if r.caseless else 0) for r in rules]
    # Hyperscan has no backreference: the quote of a quoted env value is approximated by prefilter mode.
    database.compile(expressions=[r.scout or r.pattern for r in rules], ids=list(range(len(rules))), elements=len(rules), flags=flags)
    return database


_RULES_DATABASE: list[hyperscan.Database] = []
_RULES_DATABASE_LOCK = threading.Lock()


def _rules_database() -> hyperscan.Database:
    """RULES' database, compiled on first use (a tenth of a second). A database is only read while scanning:
    threads share one, each with scratch space of its own."""
    with _RULES_DATABASE_LOCK:
        if not _RULES_DATABASE:
            _RULES_DATABASE.append(_compile(RULES))
        return _RULES_DATABASE[0]


# Scanning


@dataclass(frozen=True)
class _Piece:
    file: Path
    start: int  # host offset in the file
    length: int


@dataclass
class _Segment:
    """Bytes contiguous in the scanned space (a memory file, or the guest disk), made of pieces of files."""

    where: str
    label: str  # which memory file (for findings), or "" for the disk
    offset: int  # offset in the scanned space of the first byte
    pieces: list[_Piece]

    @property
    def boundary(self) -> int:
        return DISK_BOUNDARY if self.where == "disk" else MEMORY_BOUNDARY

    def chunks(self, buffer: memoryview) -> Iterator[tuple[int, memoryview]]:
        """(offset of the chunk's first byte, its bytes), each chunk starting REACH bytes before its
        predecessor's end. The bytes are a view of `buffer` (REACH + CHUNK bytes), valid until the next
        chunk is asked for; files are read into it with the GIL released."""
        kept, position = 0, self.offset  # kept: bytes of the previous chunk at the buffer's start
        for piece in self.pieces:
            with open(piece.file, "rb", buffering=0) as handle:
                done = 0
                while done < piece.length:
                    wanted = min(CHUNK, piece.length - done)
                    got = os.preadv(handle.fileno(), [buffer[kept : kept + wanted]], piece.start + done)
                    if got <= 0:  # past the file's end: the disk reads zeros
                        buffer[kept : kept + wanted], got = bytes(wanted), wanted
                    done += got
                    end = kept + got
                    yield position - kept, buffer[:end]
                    position += got
                    kept = min(REACH, end)
                    buffer[:kept] = bytes(buffer[end - kept : end])


@dataclass(frozen=True)
class _Hit:
    where: str
    label: str
    offset: int
    rule: str
    secret: bytes
    secret_offset: int
    excerpt: str


def _excerpt(text: bytes, secret_start: int, secret_end: int) -> str:
    context = text[:secret_start][-EXCERPT_CONTEXT:]
    secret = text[secret_start:secret_end]
    shown = secret[: min(8, len(secret) // 4)]
    printable = (context + shown).decode("latin-1")
    return "".join(c if " " <= c <= "~" else " " for c in printable) + "*" * 8


def _matches(rule: Rule, buffer: memoryview, base: int, low: int, high: int, unit: int) -> Iterator[tuple[int, re.Match[bytes]]]:
    """(where the match's text begins in `buffer`, match) for each match in buffer[low:high]. A block or page
    boundary also starts text: a file's first bytes follow whatever the disk holds before its block, so
    the match is also tried with the bytes before each such boundary cut off."""
    yield from ((0, match) for match in rule.regex.finditer(buffer, low, high))
    for boundary in range(low + (-(base + low) % unit), high, unit):
        if boundary > 0:
            match = rule.regex.match(buffer[boundary:high])
            if match is not None:
                yield boundary, match


def _confirm(
    buffer: memoryview, base: int, ends: dict[int, list[int]], segment: _Segment, found: dict[tuple[str, int], _Hit], rules: Sequence[Rule]
) -> None:
    for rule_id, positions in ends.items():
        rule = rules[rule_id]
        windows: list[list[int]] = []
        for end in sorted(positions):
            low, high = max(0, end - REACH), min(len(buffer), end + rule.after)
            if windows and low <= windows[-1][1]:
                windows[-1][1] = high
            else:
                windows.append([low, high])
        for low, high in windows:
            if len(found) >= MAX_HITS_PER_WORKER:
                return
            for shift, match in _matches(rule, buffer, base, low, high, segment.boundary):
                if rule.accept is not None and not rule.accept(match):
                    continue
                secret_start, secret_end = _secret_span(rule, match)
                start, secret_start, secret_end = shift + match.start(), shift + secret_start, shift + secret_end
                key = (rule.name, base + start)
                known = found.get(key)
                if known is not None and len(known.secret) >= secret_end - secret_start:
                    continue
                excerpt = _excerpt(bytes(buffer[start:secret_end]), secret_start - start, secret_end - start)
                secret = bytes(buffer[secret_start:secret_end])
                found[key] = _Hit(segment.where, segment.label, base + start, rule.name, secret, base + secret_start, excerpt)


def _scan_segments(segments: list[_Segment], rules: Sequence[Rule], database: hyperscan.Database, cancelled: threading.Event) -> list[_Hit]:
    scratch = hyperscan.Scratch(database)
    found: dict[tuple[str, int], _Hit] = {}
    chunk_buffer = memoryview(bytearray(REACH + CHUNK))
    for segment in segments:
        for base, buffer in segment.chunks(chunk_buffer):
            if cancelled.is_set() or len(found) >= MAX_HITS_PER_WORKER:
                return list(found.values())
            ends: dict[int, list[int]] = {}
            counted = [0]

            def on_match(
                rule_id: int,
                _from: int,
                to: int,
                _flags: int,
                _context: object,
                ends: dict[int, list[int]] = ends,
                counted: list[int] = counted,
            ) -> bool:
                ends.setdefault(rule_id, []).append(to)
                counted[0] += 1
                return counted[0] >= MAX_ENDS_PER_CHUNK  # True stops this chunk's scan

            with contextlib.suppress(hyperscan.ScanTerminated):
                # hyperscan scans any buffer, without a copy; its stub allows only str and bytes
                database.scan(buffer, match_event_handler=on_match, scratch=scratch)  # type: ignore[type-var]
            if ends:
                _confirm(buffer, base, ends, segment, found, rules)
    return list(found.values())


def _balanced(segments: list[_Segment], workers: int) -> list[list[_Segment]]:
    shares: list[list[_Segment]] = [[] for _ in range(workers)]
    loads = [0] * workers
    for segment in _split(segments, workers):
        least = loads.index(min(loads))
        shares[least].append(segment)
        loads[least] += sum(p.length for p in segment.pieces)
    return [share for share in shares if share]


def _split(segments: list[_Segment], workers: int) -> list[_Segment]:
    """Cut large segments so the workers share them evenly; each part reaches REACH bytes into the next."""
    total = sum(p.length for s in segments for p in s.pieces)
    most = max(CHUNK * 4, total // (workers * 2) + 1)
    parts = []
    for segment in sorted(segments, key=lambda s: -sum(p.length for p in s.pieces)):
        pieces = list(segment.pieces)
        offset = segment.offset
        while pieces:
            taken, size = [], 0
            while pieces and size < most:
                piece = pieces.pop(0)
                if size + piece.length > most:
                    cut = most - size
                    pieces.insert(0, _Piece(piece.file, piece.start + cut, piece.length - cut))
                    piece = _Piece(piece.file, piece.start, cut)
                taken.append(piece)
                size += piece.length
            reach, extra = REACH, []
            for piece in pieces:  # the overlap, so a secret across the cut is still seen whole
                if reach <= 0:
                    break
                extra.append(_Piece(piece.file, piece.start, min(reach, piece.length)))
                reach -= extra[-1].length
            parts.append(_Segment(segment.where, segment.label, offset, taken + extra))
            offset += size
    return parts


async def _scan(segments: list[_Segment], rules: Sequence[Rule] = RULES) -> list[_Hit]:
    if not segments:
        return []
    cancelled = threading.Event()
    shares = _balanced(segments, SCAN_THREADS)
    loop = asyncio.get_running_loop()
    # With literals, one database of them and the rules, compiled for this scan: 107 ms against the rules'
    # 100 ms with 100 values of 256 bytes, and one pass over each chunk with it takes a third less time than
    # two passes with a database each (94 ms against 79 + 65 ms per 256 MiB on one core).
    database = await loop.run_in_executor(_EXECUTOR, _rules_database if rules is RULES else lambda: _compile(rules))
    try:
        results = await asyncio.gather(
            *(loop.run_in_executor(_EXECUTOR, _scan_segments, share, rules, database, cancelled) for share in shares)
        )
    finally:
        cancelled.set()
    return await loop.run_in_executor(_EXECUTOR, _merged, results, rules)


def _merged(results: list[list[_Hit]], rules: Sequence[Rule]) -> list[_Hit]:
    merged: dict[tuple[str, str, str, int], _Hit] = {}
    for hits in results:
        for hit in hits:  # parts overlap by REACH bytes: one hit may be seen twice
            key = (hit.where, hit.label, hit.rule, hit.offset)
            if key not in merged or len(hit.secret) > len(merged[key].secret):
                merged[key] = hit
    return _most_specific(list(merged.values()), rules)


def _most_specific(hits: list[_Hit], rules: Sequence[Rule] = RULES) -> list[_Hit]:
    """One finding per secret: where two rules matched the same bytes, the earlier rule (the more specific).
    The spans kept in one file are disjoint, so they stay sorted by start and by end alike: only the one
    starting last before a new span ends can overlap it."""
    order = {name: index for index, name in reversed(list(enumerate(r.name for r in rules)))}
    kept: list[_Hit] = []
    claimed: dict[tuple[str, str], tuple[list[int], list[int]]] = {}
    for hit in sorted(hits, key=lambda h: (order[h.rule], h.offset)):
        starts, ends = claimed.setdefault((hit.where, hit.label), ([], []))
        start, end = hit.secret_offset, hit.secret_offset + len(hit.secret)
        index = bisect.bisect_left(starts, end)
        if index > 0 and ends[index - 1] > start:
            continue
        starts.insert(index, start)
        ends.insert(index, end)
        kept.append(hit)
    return kept


# Memory


def _data_ranges(path: Path) -> list[tuple[int, int]]:
    """The file's (start, length) ranges holding data: holes of a sparse RAM file read as zeros."""
    size = path.stat().st_size
    ranges = []
    with open(path, "rb", buffering=0) as handle:
        fd, position = handle.fileno(), 0
        while position < size:
            try:
                start = os.lseek(fd, position, os.SEEK_DATA)
            except OSError as error:
                if error.errno == errno.ENXIO:  # no data past here
                    break
                return [(0, size)]  # a filesystem that cannot tell: all of it
            end = os.lseek(fd, start, os.SEEK_HOLE)
            ranges.append((start, end - start))
            position = end
    return ranges


def _memory_segments(memory_files: list[Path]) -> list[_Segment]:
    """A segment per stretch of data, a hole shorter than HOLE_READ read through (a RAM file is sparse
    wherever the guest never wrote, in holes of a few pages as often as of gigabytes)."""
    segments = []
    for path in memory_files:
        stretches: list[list[int]] = []
        for start, length in _data_ranges(path):
            if stretches and start - stretches[-1][1] < HOLE_READ:
                stretches[-1][1] = start + length
            else:
                stretches.append([start, start + length])
        segments += [_Segment("memory", path.name, start, [_Piece(path, start, end - start)]) for start, end in stretches]
    return segments


# Disk


async def _run(*command: str) -> str:
    process = await asyncio.create_subprocess_exec(*command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        stdout, stderr = await process.communicate()
    except BaseException:  # cancelled (the orchestrator stops): the tool stops too
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await asyncio.shield(process.wait())
        raise
    if process.returncode != 0:
        raise RuntimeError(f"{command[0]} failed ({process.returncode}): {stderr.decode(errors='replace').strip()}")
    return stdout.decode(errors="replace")


async def _written_extents(layers: list[Path]) -> list[dict]:
    mapped = json.loads(await _run("qemu-img", "map", "-U", "--output=json", str(layers[0])))
    return [e for e in mapped if e.get("data") and not e.get("zero") and e.get("depth", len(layers)) < len(layers)]


async def _disk_segments(layers: list[Path], workspace: Path) -> list[_Segment]:
    """The extents the layers hold, as segments of the guest disk: guest-contiguous extents join into one
    segment even when their clusters lie apart in the files. A compressed extent (`qemu-img map` gives it
    no host offset; QEMU writes them only when asked to, as by `qemu-img convert -c`, never for a running
    VM) is read through QEMU, which decompresses it, into a raw copy first."""
    segments: list[_Segment] = []
    for extent in await _written_extents(layers):
        if "offset" in extent and not extent.get("compressed"):
            piece = _Piece(layers[extent["depth"]], int(extent["offset"]), int(extent["length"]))
        else:
            copy = workspace / f"extent-{extent['start']}.raw"
            await _copy_out(layers[0], int(extent["start"]), int(extent["length"]), copy)
            piece = _Piece(copy, 0, int(extent["length"]))
        last = segments[-1] if segments else None
        if last is not None and last.offset + sum(p.length for p in last.pieces) == extent["start"]:
            last.pieces.append(piece)
        else:
            segments.append(_Segment("disk", "", int(extent["start"]), [piece]))
    return segments


async def _copy_out(image: Path, start: int, length: int, target: Path) -> None:
    """The guest bytes [start, start + length) of a qcow2 disk, into a raw file."""
    window = f"driver=raw,offset={start},size={length},file.driver=qcow2,file.file.filename={str(image).replace(',', ',,')}"
    await _run("qemu-img", "convert", "-U", "--image-opts", window, "-O", "raw", str(target))


def _debugfs(raw: Path, request: str) -> str:
    done = subprocess.run(["debugfs", "-R", request, str(raw)], capture_output=True, text=True, check=False)
    return done.stdout


def _block_size(raw: Path) -> int | None:
    with open(raw, "rb") as handle:
        handle.seek(1024)
        superblock = handle.read(1024)
    if len(superblock) < 64 or superblock[56:58] != b"\x53\xef":
        return None
    return 1024 << int.from_bytes(superblock[24:28], "little")


def _names(raw: Path, offsets: list[int]) -> dict[int, list[str]]:
    """Guest disk offset -> the paths of the file holding it ([] for free space), through debugfs."""
    block_size = _block_size(raw)
    if block_size is None:
        return {offset: ["(no ext4 filesystem)"] for offset in offsets}
    blocks = sorted({offset // block_size for offset in offsets})
    inode_of: dict[int, int] = {}
    for batch in range(0, len(blocks), 500):
        for line in _debugfs(raw, "icheck " + " ".join(map(str, blocks[batch : batch + 500]))).splitlines()[1:]:
            block, _, inode = line.partition("\t")
            if inode.strip().isdigit():
                inode_of[int(block)] = int(inode)
    inodes = sorted(set(inode_of.values()))
    paths: dict[int, list[str]] = {}
    for batch in range(0, len(inodes), 500):
        for line in _debugfs(raw, "ncheck " + " ".join(map(str, inodes[batch : batch + 500]))).splitlines()[1:]:
            inode, _, path = line.partition("\t")
            if inode.strip().isdigit():
                paths.setdefault(int(inode), []).append("/" + path.lstrip("/"))
    named: dict[int, list[str]] = {}
    for offset in offsets:
        owner = inode_of.get(offset // block_size)
        if owner is None:
            named[offset] = []
        elif owner in paths:
            named[offset] = sorted(paths[owner])
        else:
            named[offset] = ["(journal)" if owner == 8 else f"(inode {owner}, no name)"]
    return named


async def _name_disk_hits(hits: list[_Hit], layers: list[Path], workspace: Path) -> dict[int, list[str]]:
    raw = workspace / "disk.raw"
    # the raw view takes what the whole chain holds (at most): made only when the disk keeps its reserve after
    needed = sum(_allocated(path) for path in layers) + await _base_allocated(layers[0])
    if shutil.disk_usage(workspace).free - needed < WORKSPACE_RESERVE:
        return {hit.offset: [UNNAMED] for hit in hits}
    await _run("qemu-img", "convert", "-U", "-O", "raw", str(layers[0]), str(raw))
    try:
        return await asyncio.to_thread(_names, raw, [hit.offset for hit in hits])
    finally:
        await asyncio.to_thread(raw.unlink, missing_ok=True)  # a sparse file of the disk's size: not instant


def _allocated(path: Path) -> int:
    try:
        return path.stat().st_blocks * 512
    except OSError:
        return 0


async def _base_allocated(top: Path) -> int:
    """Allocated bytes of the image disk at the bottom of a chain of layers."""
    chain = json.loads(await _run("qemu-img", "info", "-U", "--backing-chain", "--output=json", str(top)))
    return _allocated(Path(chain[-1]["filename"])) if chain else 0


async def _unchanged(base: Path, hits: list[_Hit]) -> set[_Hit]:
    """The hits whose bytes the base disk holds at the same offset: a layer holds whole clusters, so it also
    carries image data next to what the organisation wrote."""
    info = json.loads(await _run("qemu-img", "info", "-U", "--output=json", str(base)))
    # the disk grows past the image's size (a VM's disk is larger): what lies beyond, the image never held
    hits = [hit for hit in hits if hit.secret_offset + len(hit.secret) <= int(info["virtual-size"])]
    contents: list[bytes] = []
    for batch in range(0, len(hits), 500):
        reads = [f"read -v {hit.secret_offset} {len(hit.secret)}" for hit in hits[batch : batch + 500]]
        output = await _run("qemu-io", "-r", "-U", *(arg for read in reads for arg in ("-c", read)), str(base))
        current = bytearray()
        for line in output.splitlines():
            dump = _HEX_LINE.match(line)
            if dump:
                current += bytes.fromhex(dump.group(1))
            elif line.startswith("read "):
                contents.append(bytes(current))
                current = bytearray()
    return {hit for hit, content in zip(hits, contents, strict=True) if content == hit.secret}


_HEX_LINE = re.compile(r"^[0-9a-f]{8,}: ((?: [0-9a-f]{2})+)  ")


# The scan


def _allowed(path: str, allow_paths: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(path, pattern) for pattern in allow_paths)


async def scan_commit(
    memory_files: list[Path], layers: list[Path], base: Path | None, allow_paths: list[str], literals: Sequence[bytes] = ()
) -> list[Finding]:
    """Findings in a commit's memory files (every byte) and in the disk data its layers hold (top first;
    `base` is the image disk at the bottom of the chain, not scanned: a match whose bytes it holds at the
    same offset was not written by the organisation, and is not reported). Findings in files matching an
    `allow_paths` pattern are dropped, and so are memory copies of their secrets. A secret that appears
    many times in memory is reported once, at its first offset in each file. `literals` (org_literals of
    the owning org's variables) are looked for too, as rule LITERAL_RULE."""
    rules = [*_literal_rules(literals), *RULES] if literals else RULES
    findings: list[Finding] = []
    allowed_secrets: set[bytes] = set()
    workspace = Path(tempfile.mkdtemp(prefix=WORKSPACE_PREFIX, dir=layers[0].parent)) if layers else None
    try:
        segments = await _disk_segments(layers, workspace) if workspace is not None else []
        hits = await _scan(segments + await asyncio.to_thread(_memory_segments, memory_files), rules)
        disk_hits = sorted((h for h in hits if h.where == "disk"), key=lambda h: h.offset)
        if disk_hits and base is not None:
            unchanged = await _unchanged(base, disk_hits)
            disk_hits = [hit for hit in disk_hits if hit not in unchanged]
        names = await _name_disk_hits(disk_hits, layers, workspace) if disk_hits and workspace is not None else {}
    finally:
        if workspace is not None:
            await asyncio.to_thread(shutil.rmtree, workspace, ignore_errors=True)
    for hit in disk_hits:
        paths = names.get(hit.offset) or [FREE_SPACE]
        # every name of the file allowed: a hard link under an allowed path does not hide a file elsewhere
        if all(_allowed(path, allow_paths) for path in paths) and paths != [FREE_SPACE]:
            allowed_secrets.add(hit.secret)
            continue
        findings.append(Finding("disk", paths[0], hit.offset, hit.rule, hit.excerpt))
    seen: set[tuple[str, str, bytes]] = set()
    for hit in sorted((h for h in hits if h.where == "memory"), key=lambda h: (h.label, h.offset)):
        # a copy of an allowed secret, whole or cut short (a page boundary cuts a heap copy of a host key)
        if any(hit.secret in allowed for allowed in allowed_secrets) or (hit.label, hit.rule, hit.secret) in seen:
            continue
        seen.add((hit.label, hit.rule, hit.secret))
        findings.append(Finding("memory", "", hit.offset, hit.rule, hit.excerpt))
    return findings[:MAX_FINDINGS]
