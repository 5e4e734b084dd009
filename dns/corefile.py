"""The CoreDNS Corefile editor: keep one Canal-owned, marker-delimited block of rewrite rules in the server block
that serves the cluster domain, and touch nothing else.

Pure text in, text out (no I/O): the ConfigMap writer reads, calls `plan_corefile` / `render_corefile`, and writes.
The original bytes outside the Canal block are never re-serialised, so an unchanged Corefile round-trips byte for
byte, and removing every record (or `strip_canal_block`) gives back exactly the Corefile Canal started from.

The Canal block is whole lines right after the server block's ``{`` line: ``# canal:begin v1 sha256=<digest> --
do-not-edit note``, the rules, ``# canal:end``. The digest covers the rules' tokens (not their white space), so a
re-indented block is still Canal's, while a hand-edited one is refused rather than silently overwritten.

Grammar. The lexer and parser follow the Caddyfile rules of CoreDNS's parser (coredns/caddy), checked token for
token against its lexer loop in the tests: tokens split on white space, ``\r`` is dropped; ``#`` at the start of a
token comments out the rest of the line, but glued to a word it only hides text up to the next white space
(``foo#bar baz`` is ``foo baz``); a token that starts with ``"`` runs to the closing quote, may span lines, and
only ``\"`` is an escape; ``{`` and ``}`` are braces only as whole tokens (``{$VAR}``, ``{{ .Name }}`` are plain
tokens); a server block is keys (space or comma separated, ``[scheme://]zone[:port]``) then ``{`` ... ``}``;
``(name) { }`` defines a snippet; ``import`` splices a snippet or files. A directive runs to the end of its line
unless a ``{`` opens a block, and a server block's closing ``}`` must start its line. We are stricter than CoreDNS
in two places, both "report, never write": an unterminated quote is an error (CoreDNS ends the token at EOF), and
so is a server block without braces. Files pulled in with ``import`` are invisible here: the editor assumes they
hold no rules for Canal's names.

Mechanism: ``rewrite``, not ``hosts``. CoreDNS runs plugins in the order fixed at build time (``cache ->
rewrite -> template -> hosts -> ... -> kubernetes``), whatever the Corefile order, so both could override cluster
names. ``hosts`` is out: a server block may have only ONE hosts block (k3s already has its NodeHosts block, which is
not ours to edit), one TTL for all its entries, and it would pin the gateway's ClusterIP into the Corefile. With
``rewrite name exact NAME GATEWAY-NAME`` the question is renamed and the ``kubernetes`` plugin answers it with the
gateway Service's current addresses (A and AAAA, dual-stack, no Corefile change when they move), each rule is one
line (clean diffs, exact-match only, no regex built from names), and rules from every ``rewrite`` line of a
server block join one list in Corefile order, so Canal's block, placed first in the server block, wins over any
user rewrite for the same name. Answer rewriting: for an ``exact`` name rule CoreDNS always rewrites the answer
back to the name the client asked for (owner names and CNAME/SRV/... targets in >= 1.10, where ``answer auto`` is
implied; answer names in older releases), and releases before 1.10 reject any ``answer ...`` option on an exact
rule. So the bare ``rewrite stop name exact FROM TO`` is both correct and the most portable form.

TTLs. A renamed answer carries the TTL of the plugin that answered the gateway's name: the kubernetes plugin's
``ttl`` (5 s by default, 30 s in the kubeadm and AKS defaults). To honour the record's TTL each name also gets a
``rewrite continue ttl exact NAME TTL`` rule, placed before its name rule (both match the original question; the
ttl rule's ``continue`` lets the name rule run). The ``cache`` plugin runs before ``rewrite``, so it stores the
final answer and caps it at its own TTL; cache hits never reach the rewrite rules, whose cost is linear in the
number of rules on a miss.

``address.ips`` (no gateway Service to rename to): the question is renamed to a Canal-owned name,
``<gateway>.<namespace>.canal.<cluster-domain>`` (`canal_name`; no Kubernetes DNS name has ``canal`` where
``svc``/``pod`` go, so it can never clash), and ``template`` stanzas, one set per gateway, answer that name: A and
AAAA with the gateway's addresses and the record TTL, then NODATA with an SOA for every other type (NXDOMAIN for
a name that has A records would make resolvers drop the name altogether). Templates are used, not hosts, for the
one-hosts-block rule above; they run after rewrite, so the rewritten name is what they see, and the rewrite rule
maps the answer back.

Known limits (not fixable from the Corefile): ``autopath`` completes search paths after ``rewrite`` has run, so
short names it completes bypass the rules (reported as a warning); a Canal block only takes effect once CoreDNS
reloads (the ``reload`` plugin; a missing one is a warning); SRV and other types for a renamed name are the
gateway Service's. Size: two lines of about 110 bytes per Service-backed name, so ~5,000 names make an 840 KiB
Corefile, near the 1 MiB ConfigMap limit; larger meshes need Canal's own DNS server (``dns.mode: server``).
"""

from __future__ import annotations

import difflib
import hashlib
import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from canal.desired import DnsRecord

__all__ = [
    "BEGIN_MARKER",
    "END_MARKER",
    "CanalBlock",
    "Comment",
    "Corefile",
    "CorefileEdit",
    "CorefileError",
    "Directive",
    "ServerBlock",
    "ServerKey",
    "Snippet",
    "Token",
    "canal_name",
    "corefile_diff",
    "find_canal_block",
    "has_canal_block",
    "parse_corefile",
    "plan_corefile",
    "render_canal_block",
    "render_corefile",
    "strip_canal_block",
    "tokenize",
]

BEGIN_MARKER = "# canal:begin"
END_MARKER = "# canal:end"
FORMAT = "v1"
CANAL_LABEL = "canal"
NOTE = "managed by Canal, do not edit: rewritten on every change"
TTL_MAX = 2**31 - 1  # CoreDNS's rewrite ttl rule rejects larger values
DEFAULT_INDENT = "    "
_DIGEST_LEN = 16

_MARKER = re.compile(r"#\s*canal:(begin|end)\b")
_MARKER_LINE = re.compile(r"^[ \t]*#\s*canal:(?:begin|end)\b", re.MULTILINE)
_BEGIN = re.compile(r"#\s*canal:begin\s+(\S+)\s+sha256=([0-9a-f]+)(?:\s|$)")
_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")
_PORT = re.compile(r"\d+|\{\$[^}]*\}|\{%[^}]*%\}")
_DEFAULT_PORTS = {"dns": "53", "tls": "853", "quic": "853", "grpc": "443", "https": "443", "https3": "443"}


class CorefileError(ValueError):
    """Why a Corefile cannot be edited; whatever raised it, nothing may be written.

    ``kind`` groups the causes for callers and status messages: ``syntax`` (the Corefile does not parse),
    ``layout`` (it parses, but not in a shape Canal edits safely), ``no-server-block`` / ``ambiguous`` (zero or
    several server blocks serve the cluster domain), ``canal-block`` (a broken or hand-edited Canal block) and
    ``record`` (a DNS record that cannot be written as a rule).
    """

    def __init__(self, reason: str, line: int | None = None, kind: str = "syntax") -> None:
        self.reason = reason
        self.line = line
        self.kind = kind
        super().__init__(f"line {line}: {reason}" if line is not None else reason)


# ============================================================================================== lexer


@dataclass(frozen=True, slots=True)
class Token:
    """One Caddyfile token: its value as CoreDNS sees it, and where it sits in the source (for editing in place)."""

    text: str  # quotes removed, \" unescaped
    start: int  # source offsets, end exclusive
    end: int
    line: int  # 1-based line of the first character
    end_line: int  # differs from line only for a quoted token spanning lines
    quoted: bool


@dataclass(frozen=True, slots=True)
class Comment:
    """A ``#`` comment, kept because Canal's markers are comments."""

    text: str  # from '#' to the end of the line, without the line break
    start: int
    end: int
    line: int
    own_line: bool  # nothing but white space before it on its line


# Go's unicode.IsSpace (what the Caddyfile lexer splits on) minus the line feed, which the lexer counts. Python's
# \s would also split on the ASCII separators \x1c-\x1f, which Go keeps inside tokens.
_SPACE_CLASS = "\t\v\f\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_WORD = rf"[^{_SPACE_CLASS}\n#]"
_SCAN = re.compile(
    rf"(?P<nl>\n)|(?P<ws>[{_SPACE_CLASS}]+)|(?P<comment>#[^\n]*)|(?P<quote>\")|(?P<word>{_WORD}+(?:\r+{_WORD}+)*)"
)
# After a word, '#' only hides the text up to the next white space (the lexer returns the word there and forgets
# it was in a comment), so `foo#bar baz` is the tokens `foo` and `baz`.
_GLUED_COMMENT = re.compile(rf"\r*(#[^{_SPACE_CLASS.replace(chr(13), '')}\n]*)")
_QUOTED = re.compile(r'(?:[^"\\]|\\.)*"', re.DOTALL)  # the rest of a quoted token, closing quote included
_UNESCAPE = re.compile(r"\\(.)", re.DOTALL)


def _unescape(match: re.Match[str]) -> str:
    """Inside quotes only \\" is an escape; a backslash before anything else stays (pairs read left to right)."""
    return '"' if match.group(1) == '"' else match.group(0)


def _lex(text: str) -> tuple[tuple[Token, ...], tuple[Comment, ...]]:
    """Tokens and comments with their offsets, by the Caddyfile lexer's rules (see the module docstring)."""
    tokens: list[Token] = []
    comments: list[Comment] = []
    n = len(text)
    i = 1 if text.startswith("\ufeff") else 0  # CoreDNS discards a byte order mark
    line = 1
    line_has_token = False
    scan = _SCAN.match
    while i < n:
        m = scan(text, i)
        assert m is not None  # the alternatives cover every character
        kind = m.lastgroup
        end = m.end()
        if kind == "nl":
            line += 1
            line_has_token = False
        elif kind == "word":
            word = m.group()
            tokens.append(Token(word.replace("\r", "") if "\r" in word else word, i, end, line, line, False))
            line_has_token = True
            glued = _GLUED_COMMENT.match(text, end)
            if glued is not None:
                comments.append(Comment(glued.group(1), glued.start(1), glued.end(1), line, False))
                end = glued.end()
        elif kind == "comment":
            raw_end = end - 1 if text[end - 1] == "\r" else end
            comments.append(Comment(text[i:raw_end], i, raw_end, line, not line_has_token))
        elif kind == "quote":
            rest = _QUOTED.match(text, end)
            if rest is None:
                raise CorefileError("unterminated quoted string", line)
            end = rest.end()
            body = text[i + 1 : end - 1]
            value = _UNESCAPE.sub(_unescape, body) if "\\" in body else body
            newlines = body.count("\n")
            tokens.append(Token(value, i, end, line, line + newlines, True))
            line += newlines
            line_has_token = True
        i = end
    return tuple(tokens), tuple(comments)


def tokenize(text: str) -> tuple[tuple[Token, ...], tuple[Comment, ...]]:
    """The Corefile's tokens and comments, exactly as CoreDNS's lexer splits them (pure)."""
    return _lex(text)


def _line_start(text: str, offset: int) -> int:
    return text.rfind("\n", 0, offset) + 1


def _line_end(text: str, offset: int) -> int:
    """Offset just after the line break ending the line that holds ``offset`` (or the end of the text)."""
    end = text.find("\n", offset)
    return len(text) if end < 0 else end + 1


def _indent_of(text: str, offset: int) -> str:
    start = _line_start(text, offset)
    return text[start:offset]


def _leading(text: str, offset: int) -> str:
    """The white space that starts the line holding ``offset``."""
    start = _line_start(text, offset)
    end = start
    while end < len(text) and text[end] in " \t":
        end += 1
    return text[start:end]


# ============================================================================================== parser


@dataclass(frozen=True, slots=True)
class Directive:
    """A directive line and, when it opens a brace block, the lines of that block parsed the same way."""

    name: str
    args: tuple[str, ...]  # the tokens after the name on its first line, up to an opening brace
    tokens: tuple[Token, ...]  # every token, braces and nested lines included
    children: tuple[Directive, ...]

    @property
    def line(self) -> int:
        return self.tokens[0].line

    @property
    def end_line(self) -> int:
        return self.tokens[-1].end_line

    @property
    def start(self) -> int:
        return self.tokens[0].start

    @property
    def end(self) -> int:
        return self.tokens[-1].end


@dataclass(frozen=True, slots=True)
class ServerKey:
    """``[scheme://]zone[:port]``, normalised the way CoreDNS listens and dispatches."""

    text: str
    scheme: str
    zone: str  # lower case, with the trailing dot ("." for the root)
    port: str  # digits, or an environment placeholder kept as written

    @classmethod
    def parse(cls, text: str) -> ServerKey:
        scheme, sep, rest = text.partition("://")
        if not sep:
            scheme, rest = "dns", text
        scheme = scheme.lower()
        zone, port = rest, ""
        head, colon, tail = rest.rpartition(":")
        if colon and _PORT.fullmatch(tail):
            zone, port = head, tail
        zone = zone.lower()
        if not zone.endswith("."):
            zone += "."
        return cls(text, scheme, zone, port or _DEFAULT_PORTS.get(scheme, "53"))

    @property
    def listener(self) -> tuple[str, str]:
        return (self.scheme, self.port)


@dataclass(frozen=True, slots=True)
class ServerBlock:
    keys: tuple[ServerKey, ...]
    directives: tuple[Directive, ...]
    open_brace: Token
    close_brace: Token
    line: int  # the line of the first key

    @property
    def label(self) -> str:
        return " ".join(k.text for k in self.keys)


@dataclass(frozen=True, slots=True)
class Snippet:
    name: str
    directives: tuple[Directive, ...]
    open_brace: Token
    close_brace: Token
    line: int


@dataclass(frozen=True, slots=True)
class Corefile:
    """A parsed Corefile; ``source`` is the text it came from, which edits splice rather than re-serialise."""

    source: str
    tokens: tuple[Token, ...]
    comments: tuple[Comment, ...]
    blocks: tuple[ServerBlock, ...]
    snippets: tuple[Snippet, ...]
    imports: tuple[Directive, ...]  # top-level ``import`` lines (server blocks from files or snippets)

    def snippet(self, name: str) -> Snippet | None:
        return next((s for s in self.snippets if s.name == name), None)


class _Parser:
    """Mirrors coredns/caddy's caddyfile parser, building a structure instead of per-directive token lists."""

    def __init__(self, tokens: tuple[Token, ...]) -> None:
        self.tokens = tokens
        self.pos = 0

    def new_line(self, pos: int) -> bool:
        return pos == 0 or self.tokens[pos].line > self.tokens[pos - 1].end_line

    def parse(self) -> tuple[list[ServerBlock], list[Snippet], list[Directive]]:
        blocks: list[ServerBlock] = []
        snippets: list[Snippet] = []
        imports: list[Directive] = []
        while self.pos < len(self.tokens):
            tok = self.tokens[self.pos]
            if tok.text == "import" and self.new_line(self.pos):
                imports.append(self.import_line())
            elif tok.text in ("{", "}"):
                raise CorefileError(f"unexpected '{tok.text}' where a server block should start", tok.line)
            else:
                keys, first = self.keys()
                open_brace, directives, close_brace = self.body(first)
                if len(keys) == 1 and keys[0].startswith("(") and keys[0].endswith(")"):
                    name = keys[0][1:-1]
                    if any(s.name == name for s in snippets):
                        raise CorefileError(f"snippet ({name}) is defined twice", first.line)
                    snippets.append(Snippet(name, directives, open_brace, close_brace, first.line))
                else:
                    parsed = tuple(ServerKey.parse(k) for k in keys)
                    blocks.append(ServerBlock(parsed, directives, open_brace, close_brace, first.line))
        return blocks, snippets, imports

    def import_line(self) -> Directive:
        start = self.pos
        self.pos += 1
        while self.pos < len(self.tokens) and not self.new_line(self.pos):
            self.pos += 1
        toks = self.tokens[start : self.pos]
        if len(toks) != 2:
            raise CorefileError("import takes exactly one argument (a snippet name, file or glob)", toks[0].line)
        return Directive("import", (toks[1].text,), toks, ())

    def keys(self) -> tuple[list[str], Token]:
        first = self.tokens[self.pos]
        keys: list[str] = []
        expecting = False
        while True:
            tok = self.tokens[self.pos]
            if tok.text == "{":
                if expecting:
                    raise CorefileError("expected another server block key after a trailing comma", tok.line)
                return keys, first
            if tok.text == "}":
                raise CorefileError("unexpected '}' in server block keys", tok.line)
            value = tok.text
            if value:
                expecting = value.endswith(",")
                keys.append(value[:-1] if expecting else value)
            self.pos += 1
            if self.pos >= len(self.tokens):
                raise CorefileError(f"server block '{' '.join(keys)}' has no '{{ ... }}' body", first.line, "layout")
            if not expecting and self.new_line(self.pos):
                nxt = self.tokens[self.pos]
                if nxt.text == "{":
                    return keys, first
                raise CorefileError(
                    f"server block '{' '.join(keys)}' has no '{{' (a server block without braces is not supported)",
                    first.line,
                    "layout",
                )

    def body(self, first: Token) -> tuple[Token, tuple[Directive, ...], Token]:
        open_brace = self.tokens[self.pos]
        self.pos += 1
        directives: list[Directive] = []
        while True:
            if self.pos >= len(self.tokens):
                raise CorefileError("unbalanced braces: the '{' opened here is never closed", open_brace.line)
            tok = self.tokens[self.pos]
            if tok.text == "}":
                self.pos += 1
                return open_brace, tuple(directives), tok
            if tok.text == "{":
                raise CorefileError("unexpected '{' where a directive should start", tok.line)
            directives.append(self.directive())

    def directive(self) -> Directive:
        """A server-level directive: one line, plus any brace blocks it opens (whose lines may span many)."""
        start = self.pos
        name = self.tokens[start]
        self.pos += 1
        args: list[str] = []
        children: list[Directive] = []
        opened = False
        while self.pos < len(self.tokens) and not self.new_line(self.pos):
            tok = self.tokens[self.pos]
            if tok.text == "}":
                raise CorefileError(f"unexpected '}}' after directive '{name.text}': no matching '{{'", tok.line)
            self.pos += 1
            if tok.text == "{":
                opened = True
                children.extend(self.nested(tok))
            elif not opened:
                args.append(tok.text)
        return Directive(name.text, tuple(args), self.tokens[start : self.pos], tuple(children))

    def nested(self, open_brace: Token) -> list[Directive]:
        """Lines inside a directive's braces, up to and including the matching '}' (which may end any line)."""
        children: list[Directive] = []
        while True:
            if self.pos >= len(self.tokens):
                raise CorefileError("unbalanced braces: the '{' opened here is never closed", open_brace.line)
            tok = self.tokens[self.pos]
            if tok.text == "}":
                self.pos += 1
                return children
            start = self.pos
            self.pos += 1
            args: list[str] = []
            grandchildren: list[Directive] = []
            opened = tok.text == "{"
            if opened:
                grandchildren.extend(self.nested(tok))
            while self.pos < len(self.tokens) and not self.new_line(self.pos):
                inner = self.tokens[self.pos]
                if inner.text == "}":
                    break
                self.pos += 1
                if inner.text == "{":
                    opened = True
                    grandchildren.extend(self.nested(inner))
                elif not opened:
                    args.append(inner.text)
            children.append(Directive(tok.text, tuple(args), self.tokens[start : self.pos], tuple(grandchildren)))


def _check_braces(text: str, tokens: tuple[Token, ...]) -> None:
    """Brace balance first, so a missing or extra brace is reported as such rather than as whatever it turns the
    rest into, with a hint: the first pair whose lines are indented differently is where a human most likely
    slipped."""
    stack: list[Token] = []
    suspect: tuple[Token, Token] | None = None
    for tok in tokens:
        if tok.text == "{":
            stack.append(tok)
        elif tok.text == "}":
            if not stack:
                hint = ""
                if suspect is not None:
                    hint = (
                        f" (the '}}' of line {suspect[1].line} closes the '{{' of line {suspect[0].line} "
                        "and looks misplaced)"
                    )
                raise CorefileError(f"unexpected '}}' with no matching '{{'{hint}", tok.line)
            opened = stack.pop()
            closes_own_line = _indent_of(text, tok.start).strip() == ""
            if suspect is None and closes_own_line and _leading(text, opened.start) != _leading(text, tok.start):
                suspect = (opened, tok)
    if stack:
        hint = ""
        if suspect is not None:
            hint = (
                f"; the '{{' of line {suspect[0].line} is closed at line {suspect[1].line} by a '}}' "
                "indented differently"
            )
        raise CorefileError(f"unbalanced braces: the '{{' opened here is never closed{hint}", stack[0].line)


def parse_corefile(text: str) -> Corefile:
    """Parse a Corefile (pure); raises CorefileError naming the line for anything CoreDNS would not load."""
    tokens, comments = _lex(text)
    _check_braces(text, tokens)
    blocks, snippets, imports = _Parser(tokens).parse()
    return Corefile(text, tokens, comments, tuple(blocks), tuple(snippets), tuple(imports))


# ============================================================================================== records


@dataclass(frozen=True, slots=True)
class _Rename:
    fqdn: str
    target: str
    ttl: int | None  # set for a gateway Service target; None for a Canal-owned name (its template has the TTL)

    @property
    def via_service(self) -> bool:
        return self.ttl is not None


@dataclass(frozen=True, slots=True)
class _Template:
    name: str  # the Canal-owned name it answers
    addresses: tuple[str, ...]
    ttl: int


def _domain(name: str) -> str:
    return name.strip().lower().rstrip(".")


def _valid_name(name: str) -> bool:
    return 0 < len(name) <= 253 and all(_LABEL.fullmatch(label) for label in name.split("."))


def _fqdn(name: str) -> str:
    return name + "."


def _in_zone(fqdn: str, zone: str) -> bool:
    """fqdn and zone both end with a dot; CIDR keys (reverse zones written as networks) never hold forward names."""
    return "/" not in zone and (zone in (".", fqdn) or fqdn.endswith("." + zone))


def canal_name(gateway: str, cluster_domain: str = "cluster.local") -> str:
    """The Canal-owned DNS name an ``address.ips`` gateway answers on: ``<name>.<namespace>.canal.<domain>``.

    Kubernetes DNS names have ``svc`` or ``pod`` where this has ``canal``, so no Service or Pod name can clash; a
    name too long for DNS falls back to a hash of the gateway (still unique, just not readable).
    """
    namespace, sep, name = gateway.partition("/")
    domain = _domain(cluster_domain)
    if not sep or not namespace or not name:
        raise CorefileError(f"gateway {gateway!r} is not namespace/name", kind="record")
    readable = f"{name}.{namespace}.{CANAL_LABEL}.{domain}".lower()
    if _valid_name(readable):
        return readable
    digest = hashlib.sha256(gateway.encode()).hexdigest()[:_DIGEST_LEN]
    hashed = f"gw-{digest}.{CANAL_LABEL}.{domain}"
    if not _valid_name(hashed):
        raise CorefileError(f"cluster domain {cluster_domain!r} is not a valid DNS name", kind="record")
    return hashed


def _plan_records(
    records: Iterable[DnsRecord], cluster_domain: str
) -> tuple[tuple[_Rename, ...], tuple[_Template, ...]]:
    """Validate the records and turn them into sorted rules; anything that cannot be written exactly is an error."""
    if not _valid_name(_domain(cluster_domain)):
        raise CorefileError(f"cluster domain {cluster_domain!r} is not a valid DNS name", kind="record")
    renames: dict[str, _Rename] = {}
    templates: dict[str, _Template] = {}
    for record in records:
        fqdn = _domain(record.fqdn)
        if not _valid_name(fqdn):
            raise CorefileError(f"DNS record name {record.fqdn!r} is not a valid DNS name", kind="record")
        if fqdn in renames:
            raise CorefileError(f"DNS record name {fqdn} appears twice", kind="record")
        if isinstance(record.ttl, bool) or not isinstance(record.ttl, int) or not 0 <= record.ttl <= TTL_MAX:
            raise CorefileError(f"DNS record {fqdn}: TTL {record.ttl!r} is not 0..{TTL_MAX}", kind="record")
        if record.target:
            target = _domain(record.target)
            if not _valid_name(target):
                raise CorefileError(f"DNS record {fqdn}: target {record.target!r} is not a valid name", kind="record")
            renames[fqdn] = _Rename(fqdn, target, record.ttl)
            continue
        try:
            addresses = tuple(sorted({ipaddress.ip_address(a) for a in record.addresses}, key=_address_order))
        except ValueError as exc:
            raise CorefileError(f"DNS record {fqdn}: {exc}", kind="record") from None
        if not addresses:
            raise CorefileError(f"DNS record {fqdn}: no target and no addresses", kind="record")
        name = canal_name(record.gateway, cluster_domain)
        template = _Template(name, tuple(str(a) for a in addresses), record.ttl)
        known = templates.setdefault(name, template)
        if known != template:
            raise CorefileError(
                f"records of gateway {record.gateway} disagree on addresses or TTL ({fqdn}: "
                f"{', '.join(template.addresses)} ttl {template.ttl}; others: {', '.join(known.addresses)} "
                f"ttl {known.ttl})",
                kind="record",
            )
        renames[fqdn] = _Rename(fqdn, name, None)
    return (
        tuple(renames[k] for k in sorted(renames)),
        tuple(templates[k] for k in sorted(templates)),
    )


def _address_order(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> tuple[int, int]:
    return (address.version, int(address))


# ============================================================================================== rendering


def _body_lines(renames: tuple[_Rename, ...], templates: tuple[_Template, ...], cluster_domain: str) -> list[str]:
    """The Canal block's directives, one string per line with a leading tab per nesting level (re-indented later)."""
    lines: list[str] = []
    for rename in renames:
        if rename.via_service:
            lines.append(f"rewrite continue ttl exact {rename.fqdn} {rename.ttl}")
        lines.append(f"rewrite stop name exact {rename.fqdn} {rename.target}")
    domain = _domain(cluster_domain)
    for template in templates:
        match = "^" + template.name.replace(".", r"\.") + r"\.$"
        owner = _fqdn(template.name)
        for qtype, version in (("A", 4), ("AAAA", 6)):
            answers = [a for a in template.addresses if ipaddress.ip_address(a).version == version]
            if answers:
                lines.append(f"template IN {qtype} {template.name} {{")
                lines.append(f"\tmatch {match}")
                lines.extend(f'\tanswer "{owner} {template.ttl} IN {qtype} {a}"' for a in answers)
                lines.append("\tfallthrough")
                lines.append("}")
        lines.append(f"template IN ANY {template.name} {{")  # every other type (and a missing family): NODATA
        lines.append(f"\tmatch {match}")
        soa = f"{domain}. {template.ttl} IN SOA ns.dns.{domain}. hostmaster.{domain}. 1 7200 1800 86400 {template.ttl}"
        lines.append(f'\tauthority "{soa}"')
        lines.append("\tfallthrough")
        lines.append("}")
    return lines


def _digest(tokens: Iterable[Token], source: str) -> str:
    """A digest of the block's tokens as written (quotes included), line by line: white space and line endings
    may change (an editor re-indenting the ConfigMap), any token change is tampering."""
    by_line: dict[int, list[str]] = {}
    for tok in tokens:
        by_line.setdefault(tok.line, []).append(source[tok.start : tok.end])
    canonical = "\n".join(" ".join(words) for _, words in sorted(by_line.items()))
    return hashlib.sha256(canonical.encode()).hexdigest()[:_DIGEST_LEN]


def render_canal_block(
    records: Mapping[str, DnsRecord] | Iterable[DnsRecord],
    *,
    cluster_domain: str = "cluster.local",
    indent: str = DEFAULT_INDENT,
    unit: str = DEFAULT_INDENT,
    newline: str = "\n",
) -> str:
    """The marker-delimited Canal block alone (CoreDNS-mode records only), as complete lines; "" when no record.

    Also usable as the content of an ``*.override`` file in ``coredns-custom`` (k3s, AKS), with ``indent=""``.
    """
    if indent.strip(" \t") or unit.strip(" \t") or not unit or newline not in ("\n", "\r\n"):
        raise ValueError("indent and unit must be spaces or tabs (unit not empty), newline LF or CRLF")
    values = records.values() if isinstance(records, Mapping) else records
    renames, templates = _plan_records((r for r in values if r.mode == "coredns"), cluster_domain)
    if not renames:
        return ""
    body = [indent + line.replace("\t", unit) for line in _body_lines(renames, templates, cluster_domain)]
    body_text = "\n".join(body)
    digest = _digest(_lex(body_text)[0], body_text)
    lines = [f"{indent}{BEGIN_MARKER} {FORMAT} sha256={digest} -- {NOTE}", *body, f"{indent}{END_MARKER}"]
    return "".join(line + newline for line in lines)


# ============================================================================================== the Canal block


@dataclass(frozen=True, slots=True)
class CanalBlock:
    """Where the Canal block is: ``start``/``end`` span whole lines, from the begin marker's line start to just
    after the end marker's line break, so removing them restores the text Canal inserted into."""

    block: ServerBlock
    begin: Comment
    end_marker: Comment
    start: int
    end: int
    digest: str
    intact: bool  # the body still matches the digest in the begin marker

    @property
    def line(self) -> int:
        return self.begin.line

    @property
    def end_line(self) -> int:
        return self.end_marker.line


def find_canal_block(corefile: Corefile) -> CanalBlock | None:
    """The Canal block, checked for shape (one begin, one end, own lines, directly inside one server block, no
    directive cut in two); None when there is none. Does not judge the digest: see ``CanalBlock.intact``."""
    markers = [c for c in corefile.comments if _MARKER.match(c.text)]
    if not markers:
        return None
    for marker in markers:
        if not marker.own_line:
            raise CorefileError("a Canal marker must be on a line of its own", marker.line, "canal-block")
    begins = [m for m in markers if m.text.split(":", 1)[1].startswith("begin")]
    ends = [m for m in markers if not m.text.split(":", 1)[1].startswith("begin")]
    if len(begins) > 1:
        raise CorefileError(
            f"more than one Canal block (begin markers at lines {', '.join(str(b.line) for b in begins)})",
            begins[1].line,
            "canal-block",
        )
    if len(ends) > 1:
        raise CorefileError(
            f"more than one '{END_MARKER}' (lines {', '.join(str(e.line) for e in ends)})", ends[1].line, "canal-block"
        )
    if not ends:
        raise CorefileError(f"the Canal block begun here has no '{END_MARKER}'", begins[0].line, "canal-block")
    if not begins:
        raise CorefileError(f"'{END_MARKER}' without a '{BEGIN_MARKER}' before it", ends[0].line, "canal-block")
    begin, end = begins[0], ends[0]
    if end.start < begin.start:
        raise CorefileError(f"'{END_MARKER}' comes before '{BEGIN_MARKER}'", end.line, "canal-block")
    block = next(
        (b for b in corefile.blocks if b.open_brace.end <= begin.start and end.start < b.close_brace.start), None
    )
    if block is None:
        raise CorefileError("the Canal block is not directly inside one server block", begin.line, "canal-block")
    for directive in block.directives:
        inside_begin = directive.start < begin.start < directive.end
        inside_end = directive.start < end.start < directive.end
        if inside_begin or inside_end:
            raise CorefileError(
                f"a Canal marker is inside the '{directive.name}' directive of line {directive.line}",
                (begin if inside_begin else end).line,
                "canal-block",
            )
    body = [t for t in corefile.tokens if begin.end <= t.start < end.start]
    source = corefile.source
    digest = _digest(body, source)
    parsed = _BEGIN.match(begin.text)
    intact = parsed is not None and parsed.group(1) == FORMAT and parsed.group(2) == digest
    start = _line_start(source, begin.start)
    return CanalBlock(block, begin, end, start, _line_end(source, end.start), digest, intact)


def _checked(block: CanalBlock | None, force: bool) -> CanalBlock | None:
    if block is not None and not block.intact and not force:
        raise CorefileError(
            f"the Canal block (lines {block.line}-{block.end_line}) was edited by hand: its content no longer "
            "matches the digest in its begin marker; remove the block or restore it (canal dns restore)",
            block.line,
            "canal-block",
        )
    return block


def has_canal_block(text: str) -> bool:
    """Whether Canal has touched this Corefile: a Canal marker comment is present (well-formed or not; `plan_corefile`
    and `strip_canal_block` judge that). Never raises."""
    try:
        _, comments = _lex(text)
    except CorefileError:
        return bool(_MARKER_LINE.search(text))
    return any(_MARKER.match(c.text) for c in comments)


def strip_canal_block(text: str, *, force: bool = False) -> str:
    """The Corefile without its Canal block: exactly the text Canal first inserted into. Text without a block comes
    back unchanged. A malformed block raises; a hand-edited one raises unless ``force`` (its edits are dropped)."""
    if not has_canal_block(text):
        return text
    block = _checked(find_canal_block(parse_corefile(text)), force)
    return text if block is None else text[: block.start] + text[block.end :]


# ============================================================================================== choosing a block


def _expanded(
    directives: Iterable[Directive], corefile: Corefile, seen: frozenset[str] = frozenset()
) -> list[Directive]:
    """Directives with ``import <snippet>`` replaced by the snippet's directives (file imports stay opaque)."""
    out: list[Directive] = []
    for directive in directives:
        snippet = corefile.snippet(directive.args[0]) if directive.name == "import" and directive.args else None
        if snippet is not None and snippet.name not in seen:
            out.extend(_expanded(snippet.directives, corefile, seen | {snippet.name}))
        else:
            out.append(directive)
    return out


def _kubernetes_zones(block: ServerBlock, corefile: Corefile) -> tuple[str, ...]:
    """The zones the block's kubernetes plugin answers (its arguments, else the block's zones); () when it has none."""
    for directive in _expanded(block.directives, corefile):
        if directive.name == "kubernetes":
            zones = [z if z.endswith(".") else z + "." for z in (a.lower() for a in directive.args)]
            return tuple(zones) if zones else tuple(k.zone for k in block.keys)
    return ()


def _dispatch(corefile: Corefile, listener: tuple[str, str], fqdn: str) -> ServerBlock | None:
    """The server block CoreDNS picks for a name on a listener: the one with the longest matching zone."""
    best: tuple[int, ServerBlock] | None = None
    for block in corefile.blocks:
        for key in block.keys:
            if key.listener == listener and _in_zone(fqdn, key.zone):
                if best is not None and len(key.zone) == best[0] and best[1] is not block:
                    raise CorefileError(
                        f"zone {key.zone} on {listener[0]}:{listener[1]} is served by two server blocks "
                        f"(lines {best[1].line} and {block.line})",
                        block.line,
                        "layout",
                    )
                if best is None or len(key.zone) > best[0]:
                    best = (len(key.zone), block)
    return None if best is None else best[1]


def _cluster_block(corefile: Corefile, cluster_domain: str) -> tuple[ServerBlock, tuple[tuple[str, str], ...]]:
    """The single server block that answers the cluster domain with the kubernetes plugin, and its listeners."""
    domain = _fqdn(_domain(cluster_domain))
    listeners = sorted({k.listener for b in corefile.blocks for k in b.keys})
    found: dict[int, tuple[ServerBlock, list[tuple[str, str]]]] = {}
    without: list[str] = []
    without_line: int | None = None
    for listener in listeners:
        block = _dispatch(corefile, listener, domain)
        if block is None:
            continue
        if any(_in_zone(domain, z) for z in _kubernetes_zones(block, corefile)):
            found.setdefault(id(block), (block, []))[1].append(listener)
        else:
            without.append(f"the server block '{block.label}' at line {block.line} answers it on {':'.join(listener)}")
            without_line = block.line if without_line is None else without_line
    if not found:
        detail = f": {'; '.join(without)}, but has no kubernetes plugin for it" if without else ""
        raise CorefileError(
            f"no server block serves the cluster domain {domain[:-1]} with the kubernetes plugin{detail}",
            without_line,
            "no-server-block",
        )
    if len(found) > 1:
        blocks = sorted((b for b, _ in found.values()), key=lambda b: b.line)
        raise CorefileError(
            f"more than one server block serves the cluster domain {domain[:-1]}: "
            + ", ".join(f"'{b.label}' at line {b.line}" for b in blocks)
            + "; Canal edits exactly one",
            blocks[1].line,
            "ambiguous",
        )
    ((block, served),) = found.values()
    return block, tuple(served)


# ============================================================================================== editing


@dataclass(frozen=True, slots=True)
class CorefileEdit:
    """What `plan_corefile` decided: the text before and after, and what the CLI or a status message reports."""

    before: str
    after: str
    server_block_line: int | None  # the server block holding (or that held) the Canal block; None: untouched
    names: tuple[str, ...]  # the rewritten names, sorted
    warnings: tuple[str, ...]

    @property
    def changed(self) -> bool:
        return self.before != self.after

    def diff(self, fromfile: str = "Corefile", tofile: str = "Corefile (canal)") -> str:
        return corefile_diff(self.before, self.after, fromfile=fromfile, tofile=tofile)


def _layout(corefile: Corefile, block: ServerBlock, canal: CanalBlock | None) -> tuple[str, str]:
    """The block's indentation and nesting unit, read from its own directives (Canal's excluded) so a re-render
    indents exactly like the first one did."""
    text = corefile.source
    own = [d for d in block.directives if canal is None or not canal.start <= d.start < canal.end]
    if canal is not None:
        indent = _indent_of(text, canal.begin.start)
    elif own:
        indent = _indent_of(text, own[0].start)
    else:
        indent = _indent_of(text, block.close_brace.start) + DEFAULT_INDENT
    if indent.strip(" \t"):  # other Unicode white space: indent the Canal block plainly
        indent = DEFAULT_INDENT
    unit = "\t" if indent.startswith("\t") else DEFAULT_INDENT
    for directive in own:
        if directive.children and directive.children[0].line > directive.line:
            parent = _indent_of(text, directive.start)
            child = _indent_of(text, directive.children[0].start)
            if child.startswith(parent) and len(child) > len(parent) and not child[len(parent) :].strip(" \t"):
                unit = child[len(parent) :]
                break
    return indent, unit


def _insertion_point(corefile: Corefile, block: ServerBlock) -> int:
    """Just after the line holding the block's '{'; that line must hold nothing else but a comment."""
    text = corefile.source
    brace = block.open_brace
    after = _line_end(text, brace.end)
    trailing = [t for t in corefile.tokens if brace.end <= t.start < after]
    if trailing:
        raise CorefileError(
            f"the server block '{block.label}' has more on the line of its '{{'; Canal inserts whole lines after it",
            brace.line,
            "layout",
        )
    return after


def _warnings(corefile: Corefile, block: ServerBlock) -> tuple[str, ...]:
    out: list[str] = []
    everywhere = [d for b in corefile.blocks for d in _expanded(b.directives, corefile)]
    if not any(d.name == "reload" for d in everywhere):
        opaque = bool(corefile.imports) or any(d.name == "import" for d in everywhere)
        out.append(
            "no reload plugin"
            + (" (imported files not inspected)" if opaque else "")
            + ": CoreDNS reads the Corefile only at start, so the change needs a CoreDNS restart"
        )
    for directive in _expanded(block.directives, corefile):
        if directive.name == "autopath":
            out.append(
                f"autopath at line {directive.line}: names it completes from the search path bypass the rewrite "
                "rules (clients using short names get the Service's own address)"
            )
    return tuple(out)


def plan_corefile(
    original: str,
    records: Mapping[str, DnsRecord] | Iterable[DnsRecord],
    *,
    cluster_domain: str = "cluster.local",
) -> CorefileEdit:
    """Decide the Corefile Canal wants for these records (only ``mode == "coredns"`` ones count).

    With records: the server block serving ``cluster_domain`` gets exactly one Canal block (replaced in place if
    present, else inserted first in the block). Without: the Canal block, if any, is removed, restoring the
    original byte for byte. Raises CorefileError (nothing to write) for an unparseable Corefile, an unexpected
    layout, a broken or hand-edited Canal block, or a record that cannot be written exactly.
    """
    values = records.values() if isinstance(records, Mapping) else records
    chosen = [r for r in values if r.mode == "coredns"]
    corefile = parse_corefile(original)
    canal = _checked(find_canal_block(corefile), force=False)
    if not chosen:
        after = original if canal is None else original[: canal.start] + original[canal.end :]
        line = None if canal is None else canal.block.line
        return CorefileEdit(original, after, line, (), ())
    renames, _ = _plan_records(chosen, cluster_domain)
    block, listeners = _cluster_block(corefile, cluster_domain)
    if canal is not None and canal.block is not block:
        raise CorefileError(
            f"the Canal block (line {canal.line}) is in the server block at line {canal.block.line}, but the "
            f"cluster domain is served by the one at line {block.line}; remove it first (canal dns restore)",
            canal.line,
            "canal-block",
        )
    k8s_zones = _kubernetes_zones(block, corefile)
    for rename in renames:
        for listener in listeners:
            server = _dispatch(corefile, listener, _fqdn(rename.fqdn))
            if server is not block:
                where = "no server block" if server is None else f"the server block at line {server.line}"
                raise CorefileError(
                    f"{rename.fqdn} is answered by {where} on {':'.join(listener)}, not by the cluster-domain "
                    f"server block at line {block.line}",
                    block.line,
                    "layout",
                )
        if rename.via_service and not any(_in_zone(_fqdn(rename.target), z) for z in k8s_zones):
            raise CorefileError(
                f"{rename.fqdn}: its target {rename.target} is outside the kubernetes plugin's zones "
                f"({' '.join(k8s_zones)}) in the server block at line {block.line}",
                block.line,
                "record",
            )
    if canal is not None:
        start, end = canal.start, canal.end
    else:
        start = end = _insertion_point(corefile, block)
    indent, unit = _layout(corefile, block, canal)
    newline = "\r\n" if original[max(start - 2, 0) : start] == "\r\n" else "\n"
    text = render_canal_block(chosen, cluster_domain=cluster_domain, indent=indent, unit=unit, newline=newline)
    after = original[:start] + text + original[end:]
    written = find_canal_block(parse_corefile(after))  # never hand back text we would not accept ourselves
    if written is None or not written.intact or written.block.line != block.line:
        raise CorefileError("internal error: the rendered Canal block does not read back", block.line, "layout")
    return CorefileEdit(original, after, block.line, tuple(r.fqdn for r in renames), _warnings(corefile, block))


def render_corefile(
    original: str,
    records: Mapping[str, DnsRecord] | Iterable[DnsRecord],
    *,
    cluster_domain: str = "cluster.local",
) -> str:
    """The Corefile Canal would write: `plan_corefile(...).after`."""
    return plan_corefile(original, records, cluster_domain=cluster_domain).after


def _lines(text: str) -> list[str]:
    """Lines split on LF only (str.splitlines also splits on form feeds and U+2028, which a Corefile may hold)."""
    return re.findall(r"[^\n]*\n|[^\n]+\Z", text)


def corefile_diff(before: str, after: str, *, fromfile: str = "Corefile", tofile: str = "Corefile (canal)") -> str:
    """A unified diff (git style, including the no-newline-at-end marker); "" when nothing changes."""
    out: list[str] = []
    for line in difflib.unified_diff(_lines(before), _lines(after), fromfile=fromfile, tofile=tofile):
        out.append(line if line.endswith("\n") else line + "\n\\ No newline at end of file\n")
    return "".join(out)
