"""Family fingerprints: properties of redirect-URI and name normalization, and of the family key."""

from __future__ import annotations

import unicodedata
import warnings
from types import SimpleNamespace
from urllib.parse import urlsplit

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from reaper.analysis.fingerprint import (
    _GETTERS,
    family_key,
    ip_prefix,
    is_loopback_host,
    normalize_name,
    normalize_redirect_uri,
    parts_of,
)
from reaper.config import FAMILY_COMPONENTS

# When a property fails, Hypothesis imports libcst to suggest a patch, and that import raises a
# DeprecationWarning (mypy_extensions.TypedDict) in a pytest hook, where filterwarnings=error turns the
# failure report into an INTERNALERROR that stops the run. Import it now, quietly, so failures read normally.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    try:
        import hypothesis.extra._patching  # noqa: F401
    except Exception:  # noqa: BLE001 - only a nicer failure report is at stake
        pass

# No deadline: the first call of a cached normalizer can be slow on a busy CI machine.
prop = settings(deadline=None, max_examples=200)

# --- strategies ------------------------------------------------------------------------------------------

PATH_CHARS = "abcxyzABC0189-._~!$&'()*+,;=:@"  # RFC 3986 pchar without '%' and '/'
segment = st.text(PATH_CHARS, max_size=8)
paths = st.one_of(st.just(""), st.lists(segment, min_size=1, max_size=4).map(lambda segs: "/" + "/".join(segs)))
queries = st.one_of(st.just(""), st.text("abcxyz019=&", min_size=1, max_size=10).map(lambda q: "?" + q))
ports = st.one_of(st.none(), st.integers(0, 65535))
schemes = st.sampled_from(["http", "https", "HTTP", "Https"])

loopback_hosts = st.one_of(
    st.sampled_from(["localhost", "LOCALHOST", "LocalHost", "[::1]", "[0:0:0:0:0:0:0:1]"]),
    st.tuples(st.integers(0, 255), st.integers(0, 255), st.integers(0, 255)).map(lambda t: "127.{}.{}.{}".format(*t)),
)
label = st.text("abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=10)
dns_hosts = st.lists(label, min_size=1, max_size=4).map(".".join)
ipv4_hosts = st.tuples(*[st.integers(0, 255)] * 4).map(lambda t: "{}.{}.{}.{}".format(*t))
other_hosts = st.one_of(dns_hosts, ipv4_hosts, st.sampled_from(["[2001:db8::1]", "[fe80::1]"])).filter(
    lambda h: not is_loopback_host(h.strip("[]"))
)


def uri(scheme: str, host: str, port: int | None, path: str, query: str = "") -> str:
    return f"{scheme}://{host}{'' if port is None else f':{port}'}{path}{query}"


# --- redirect URIs ---------------------------------------------------------------------------------------


@prop
@given(schemes, loopback_hosts, ports, ports, paths, queries)
def test_loopback_uris_that_differ_only_by_port_are_the_same(scheme, host, p1, p2, path, query):
    a, b = uri(scheme, host, p1, path, query), uri(scheme, host, p2, path, query)
    assert normalize_redirect_uri(a) == normalize_redirect_uri(b)
    assert urlsplit(normalize_redirect_uri(a)).port is None
    assert family_key(FAMILY_COMPONENTS, "App", (a,), None, None, None) == family_key(
        FAMILY_COMPONENTS, "App", (b,), None, None, None
    )


@prop
@given(schemes, other_hosts, other_hosts, ports, ports, paths)
def test_different_non_loopback_hosts_never_meet(scheme, h1, h2, p1, p2, path):
    assume(h1 != h2)
    assert normalize_redirect_uri(uri(scheme, h1, p1, path)) != normalize_redirect_uri(uri(scheme, h2, p2, path))


@prop
@given(schemes, other_hosts, ports, ports, paths)
def test_a_non_loopback_host_keeps_its_port(scheme, host, p1, p2, path):
    assume(p1 != p2)
    assert normalize_redirect_uri(uri(scheme, host, p1, path)) != normalize_redirect_uri(uri(scheme, host, p2, path))


@prop
@given(schemes, loopback_hosts, other_hosts, ports, ports, paths)
def test_loopback_and_non_loopback_hosts_never_meet(scheme, loop, other, p1, p2, path):
    a, b = uri(scheme, loop, p1, path), uri(scheme, other, p2, path)
    assert normalize_redirect_uri(a) != normalize_redirect_uri(b)
    assert family_key(FAMILY_COMPONENTS, "App", (a,), None, None, None) != family_key(
        FAMILY_COMPONENTS, "App", (b,), None, None, None
    )


@prop
@given(
    st.sampled_from(["http", "https", "myapp", "com.example.app"]),
    st.sampled_from(["http", "https", "myapp", "com.example.app"]),
    st.one_of(loopback_hosts, other_hosts),
    ports,
    ports,
    paths,
)
def test_different_schemes_never_meet(s1, s2, host, p1, p2, path):
    assume(s1 != s2)
    if not is_loopback_host(host.strip("[]").lower()):
        p2 = p1  # a non-loopback port is significant: keep it equal so only the scheme differs
    assert normalize_redirect_uri(uri(s1, host, p1, path)) != normalize_redirect_uri(uri(s2, host, p2, path))


@prop
@given(schemes, st.one_of(loopback_hosts, other_hosts), ports, ports, paths, paths)
def test_different_paths_never_meet(scheme, host, p1, p2, path1, path2):
    assume(path1 != path2)
    if not is_loopback_host(host.strip("[]").lower()):
        p2 = p1
    assert normalize_redirect_uri(uri(scheme, host, p1, path1)) != normalize_redirect_uri(uri(scheme, host, p2, path2))


@prop
@given(schemes, loopback_hosts, ports, paths)
def test_normalization_is_idempotent(scheme, host, port, path):
    once = normalize_redirect_uri(uri(scheme, host, port, path))
    assert normalize_redirect_uri(once) == once


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("http://localhost:49152/callback", "http://localhost/callback"),
        ("http://LOCALHOST:1234/Callback", "http://localhost/Callback"),  # host folds, path does not
        ("HTTP://127.0.0.1:33418/", "http://127.0.0.1/"),
        ("http://127.45.6.7:9/cb?x=1", "http://127.45.6.7/cb?x=1"),
        ("http://[::1]:8080/cb", "http://[::1]/cb"),
        ("  http://localhost:5/cb  ", "http://localhost/cb"),
        ("https://Example.COM:8443/cb", "https://example.com:8443/cb"),
        ("https://vscode.dev/redirect", "https://vscode.dev/redirect"),
        ("http://localhost.example.com:5/cb", "http://localhost.example.com:5/cb"),
        ("http://localhost:8080@evil.example:9/cb", "http://localhost:8080@evil.example:9/cb"),
        (
            "com.example.app:/oauth2redirect",
            "com.example.app:/oauth2redirect",
        ),  # RFC 8252 §7.1 private scheme
        ("http://localhost:99999/cb", "http://localhost:99999/cb"),  # unreadable: kept as given
        ("not a uri", "not a uri"),
    ],
)
def test_normalize_redirect_uri_examples(raw, normalized):
    assert normalize_redirect_uri(raw) == normalized


# --- names -----------------------------------------------------------------------------------------------

# Any text but surrogates; U+0131 (dotless i) is left out of the case property on purpose: Unicode's default
# case folding keeps "ı" and "I" apart (they are the same letter only in Turkic languages).
names = st.text(st.characters(exclude_categories=("Cs",)), max_size=20)
cased_names = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\u0131"), max_size=20)
WHITESPACE = [" ", "  ", "\t", "\n", "\u00a0", "\u2003", "\u3000", " \t "]


@prop
@given(cased_names, st.data())
def test_names_that_differ_only_in_case_are_one_family(name, data):
    flips = data.draw(st.lists(st.sampled_from([str, str.upper, str.lower]), min_size=len(name), max_size=len(name)))
    variant = "".join(f(c) for f, c in zip(flips, name, strict=True))
    for other in (variant, name.upper(), name.lower(), name.swapcase()):
        assert normalize_name(other) == normalize_name(name), (name, other)
        assert family_key(("name",), other, (), None, None, None) == family_key(("name",), name, (), None, None, None)


@prop
@given(
    st.lists(
        st.text(st.characters(exclude_categories=("Cs", "Z", "Cc")), min_size=1, max_size=6),
        min_size=1,
        max_size=5,
    ),
    st.data(),
)
def test_names_that_differ_only_in_whitespace_are_one_family(words, data):
    plain = " ".join(words)
    seps = data.draw(st.lists(st.sampled_from(WHITESPACE), min_size=len(words) + 1, max_size=len(words) + 1))
    spaced = seps[0] + "".join(w + s for w, s in zip(words, seps[1:], strict=True))
    assert normalize_name(spaced) == normalize_name(plain)
    assert family_key(FAMILY_COMPONENTS, spaced, (), None, None, None) == family_key(
        FAMILY_COMPONENTS, plain, (), None, None, None
    )


@prop
@given(names, st.sampled_from(["NFC", "NFD", "NFKC", "NFKD"]))
def test_unicode_equivalent_names_are_one_family(name, form):
    other = unicodedata.normalize(form, name)
    assert normalize_name(other) == normalize_name(name)
    assert family_key(("name",), other, (), None, None, None) == family_key(("name",), name, (), None, None, None)


@prop
@given(names, names)
def test_different_names_are_different_families(a, b):
    assume(normalize_name(a) != normalize_name(b))
    for components in (("name",), FAMILY_COMPONENTS):
        uris = ("http://localhost:1/cb",)
        assert family_key(components, a, uris, "sw", "sub", "192.0.2.1") != family_key(
            components, b, uris, "sw", "sub", "192.0.2.1"
        )


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("Claude Code", "claude code"),
        ("Claude Code", "  Claude   Code "),
        ("Claude Code", "ＣＬＡＵＤＥ　Ｃｏｄｅ"),  # fullwidth letters and ideographic space
        ("Caf\u00e9", "Cafe\u0301"),  # precomposed vs combining accent
        ("Stra\u00dfe", "STRASSE"),  # full case folding
        ("\ufb01le sync", "File Sync"),  # the "fi" ligature
        ("\u0390", "\u0390".upper()),  # Greek iota with dialytika and tonos: fold, then recompose
    ],
)
def test_same_family_examples(a, b):
    assert normalize_name(a) == normalize_name(b)


@pytest.mark.parametrize(
    ("a", "b"),
    [("Claude Code", "Claude Code 2"), ("Claude Code", "ClaudeCode"), ("Cursor", "Cursor."), ("", "x")],
)
def test_different_family_examples(a, b):
    assert family_key(("name",), a, (), None, None, None) != family_key(("name",), b, (), None, None, None)


# --- the whole key ---------------------------------------------------------------------------------------

# A tiny alphabet that includes the characters a naive encoding would use as separators, so that two
# different inputs whose parts merely split differently are found quickly.
tiny = st.text("ab \x1e\x1f\x1b", max_size=4)
ips = st.sampled_from(
    [None, "", "garbage", "192.0.2.1", "192.0.2.200", "198.51.100.7", "2001:db8::1", "2001:db8:0:1::1"]
)
components = st.tuples(tiny, st.lists(tiny, max_size=3), st.one_of(st.none(), tiny), st.one_of(st.none(), tiny), ips)


def canonical(c: tuple) -> tuple:
    """What a family is: the normalized name, the set of normalized non-empty URIs, software_id, subject and
    the IP network ('' and None both mean absent)."""
    name, uris, software_id, subject, ip = c
    return (
        normalize_name(name),
        frozenset(u for u in map(normalize_redirect_uri, uris) if u),
        software_id or "",
        subject or "",
        ip_prefix(ip),
    )


def key(c: tuple) -> str:
    name, uris, software_id, subject, ip = c
    return family_key(FAMILY_COMPONENTS, name, tuple(uris), software_id, subject, ip)


@pytest.mark.slow
@settings(deadline=None, max_examples=1000)
@given(components, components)
def test_family_key_tells_families_apart_exactly(a, b):
    assert (key(a) == key(b)) == (canonical(a) == canonical(b)), (a, b)


@prop
@given(components, st.randoms())
def test_family_key_ignores_uri_order_and_duplicates(c, rnd):
    name, uris, software_id, subject, ip = c
    shuffled = list(uris) * 2
    rnd.shuffle(shuffled)
    assert key(c) == key((name, shuffled, software_id, subject, ip))


@pytest.mark.parametrize(
    ("a", "b"),
    [
        # software_id and subject are stored as given: a separator inside one must not shift it into the next.
        (("x", [], "a\x1eb", "c", None), ("x", [], "a", "b\x1ec", None)),
        # one redirect URI with a unit separator in it is not two redirect URIs.
        (
            ("x", ["http://a/\x1fhttp://b/"], None, None, None),
            ("x", ["http://a/", "http://b/"], None, None, None),
        ),
    ],
)
def test_separator_characters_cannot_merge_families(a, b):
    assert key(a) != key(b)


def test_components_not_selected_do_not_count():
    a = family_key(("name",), "App", ("http://a.example/cb",), "sw1", "alice", "192.0.2.1")
    b = family_key(("name",), "app", ("http://b.example/cb",), "sw2", "bob", "198.51.100.1")
    assert a == b
    assert family_key(FAMILY_COMPONENTS, "App", (), None, None, "192.0.2.1") == family_key(
        FAMILY_COMPONENTS, "App", (), None, None, "192.0.2.254"
    )  # one /24
    assert family_key(FAMILY_COMPONENTS, "App", (), None, None, "192.0.2.1") != family_key(
        FAMILY_COMPONENTS, "App", (), None, None, "192.0.3.1"
    )


@prop
@given(components)
def test_the_default_components_read_what_each_getter_reads(c):
    """The default component list has a path of its own, spelled out for speed: it reads the same parts."""
    name, uris, software_id, subject, ip = c
    row = SimpleNamespace(
        name=name, redirect_uris=tuple(uris), software_id=software_id, subject=subject, ip=ip, ip_network=None
    )
    assert parts_of(FAMILY_COMPONENTS)(row) == (FAMILY_COMPONENTS, *(_GETTERS[p](row) for p in FAMILY_COMPONENTS))
    row.ip_network = "192.0.2.0/24"
    assert parts_of(FAMILY_COMPONENTS)(row)[-1] == "192.0.2.0/24"
