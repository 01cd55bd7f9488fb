"""Identity numbers never reach a log handler whole (SPEC §7)."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import pytest

from gateway.masking import (
    MaskingFilter,
    install_log_masking,
    mask_excerpt,
    mask_id,
    mask_text,
    redact_urls,
)

ID18 = "630102198704139126"
ID18X = "63212319870413912X"
ID15 = "630102870413912"


@pytest.mark.parametrize(
    ("value", "masked"),
    [
        (ID18, "630102********9126"),
        (ID18X, "632123********912X"),
        (ID15, "63***********12"),
        ("G1234567", "G1****67"),
        ("abcd", "****"),
        ("", ""),
    ],
)
def test_mask_id(value: str, masked: str) -> None:
    assert mask_id(value) == masked
    assert len(mask_id(value)) == len(value)


def test_mask_text_in_a_sentence() -> None:
    text = f"赵伟 ({ID18}) and 63212319870413912x, old id {ID15}; 证件号 {ID18}。"
    assert mask_text(text) == (
        "赵伟 (630102********9126) and 632123********912x, old id 63***********12; "
        "证件号 630102********9126。"
    )


@pytest.mark.parametrize(
    "text",
    [
        "order 6301021987041391260",  # 19 digits: part of a longer run
        "ts 1234567890123",  # 13 digits
        "1234567890123456",  # 16 digits
        "plain words",
    ],
)
def test_mask_text_leaves_other_numbers(text: str) -> None:
    assert mask_text(text) == text


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ("630102 1987 0413 9126", "630102 **** **** 9126"),
        ("身份证号：６３０１０２ １９８７０４１３ ９１２６。", "身份证号：６３０１０２ ******** ９１２６。"),
        ("630102\u300019870413\u30009126", "630102\u3000********\u30009126"),  # ideographic
        ('{"身份证号": "630102\t1987 0413  9126"}', '{"身份证号": "630102\t**** ****  9126"}'),
        ("630102\n1987 0413 9126", "630102\n**** **** 9126"),  # a cell's line break
        ("630102\r\n19870413\t\t9126", "630102\r\n********\t\t9126"),
        ("630102     19870413 9126", "630102     ******** 9126"),  # five spaces
        ("630102" + " " * 16 + "19870413\n9126", "630102" + " " * 16 + "********\n9126"),
        ("632123 19870413 912X", "632123 ******** 912X"),
        ("6301 0219 8704 1391 26", "6301 02** **** **91 26"),
        ("630 102 870 413 912", "63* *** *** *** *12"),  # a first-generation id
        ("row 12 630102 1987 0413 9126 5 学分", "row 12 630102 **** **** 9126 5 学分"),
        ("630102 1987 0413 9126, 632123 1987 0413 912x",
         "630102 **** **** 9126, 632123 **** **** 912x"),
    ],
)
def test_mask_text_masks_an_identity_number_written_in_groups(text: str, masked: str) -> None:
    """SPEC §8: numbers may carry white space, and the adapters accept an id written so."""
    assert mask_text(text) == masked
    assert mask_text(masked) == masked


@pytest.mark.parametrize(
    "text",
    [
        "2026 03 05 08 30 00 hours 8 16 24.5",  # a date and hours with spaces
        "counts 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16",
        "10 20 30 40 50 60 70 80 90 100",
        "1234 5678 9012 3456 78",  # no birth date where an id has one
        "930102 1987 0413 9126",  # no region starts with 9
        "630102 2187 0413 9126",  # born in the 22nd century
        "630102 1987 1313 9126",  # month 13
        "630102" + " " * 17 + "19870413 9126",  # a gap longer than 16 characters
        "hours\n12\n8\n16\n24\n30\n40\n20\n10\n8\n",  # counts on separate lines
        "2026\n03\n05\n08\n30\n00\n8\n16",  # a date on separate lines
        "1234\n5678\n9012\n3456\n78",  # lines with no birth date where an id has one
        "930102\n19870413\n9126",  # no region starts with 9
        "R5d2c0f0e9a8b7c6d5e4f3a2b1 630102 1987 0413",  # too short
        "batch 12345678 9012345",  # 15 digits but no date shape
    ],
)
def test_mask_text_leaves_numbers_with_spaces_that_are_no_identity_number(text: str) -> None:
    assert mask_text(text) == text


@pytest.mark.parametrize("start", range(120, 200))
def test_an_excerpt_cut_across_a_grouped_identity_number_hides_it(start: int) -> None:
    """Written in groups, a number spans more than 18 characters: the cut must allow for it."""
    written = ("\n" + " " * 15).join(["6301021", *"98704139126"])  # 7 + 11 + 11 * 16 characters
    body = "x" * start + " id " + written + " refused" + "y" * 300
    excerpt = "".join(mask_excerpt(body).split())
    assert "6301021" not in excerpt  # the 7th digit, and any after it, stay starred


def test_mask_text_keeps_the_gateways_own_ids_whole() -> None:
    # A batch or record id whose hex holds an identity-number-shaped digit run between letters.
    batch_id, record_id = f"Ba{ID18}bcdef", f"R{ID15}abcdef123"
    assert len(batch_id) == len(record_id) == 25
    key = f"{ID18}abcdef01234567"  # a delivery's idempotency key (uuid4 hex)
    assert len(key) == 32
    text = f"batch {batch_id} row 3; record {record_id}, key {key}: holder {ID18}"
    assert mask_text(text) == (f"batch {batch_id} row 3; record {record_id}, key {key}: "
                               "holder 630102********9126")
    # Only the exact shape is kept: a token that merely starts like one is masked as before.
    assert mask_text(f"XBa{ID18}bcdef") == "XBa630102********9126bcdef"
    assert mask_text(f"Ba{ID18}bcdefa") == "Ba630102********9126bcdefa"  # 25 hex
    assert mask_text(f"BA{ID18}BCDEF") == "BA630102********9126BCDEF"  # not lowercase


@pytest.fixture
def captured() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    handler.addFilter(MaskingFilter())
    logger = logging.getLogger("tests.masking")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield logger, stream
    finally:
        logger.removeHandler(handler)
        logger.propagate = True


def test_filter_masks_args_and_message(captured: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = captured
    logger.info("record for %s accepted", ID18)
    logger.info("direct %s", {"id_number": ID18X})
    logger.info(f"f-string {ID18}")
    logger.info("by name %(id)s", {"id": ID18})
    out = stream.getvalue()
    assert ID18 not in out and ID18X not in out
    assert "record for 630102********9126 accepted" in out
    assert "632123********912X" in out
    assert "by name 630102********9126" in out


def test_filter_masks_exceptions_and_extra(captured: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = captured
    try:
        raise ValueError(f"bad id {ID18}")
    except ValueError:
        logger.exception("failed")
    logger.info("plain", extra={"who": ID18})
    out = stream.getvalue()
    assert ID18 not in out
    assert "ValueError: bad id 630102********9126" in out


def test_filter_keeps_positional_args_for_uvicorn_access_formatter() -> None:
    from uvicorn.logging import AccessFormatter

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(AccessFormatter('%(client_addr)s "%(request_line)s" %(status_code)s'))
    handler.addFilter(MaskingFilter())
    logger = logging.getLogger("tests.masking.access")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning(
            '%s - "%s %s HTTP/%s" %d',
            "127.0.0.1:5000",
            "GET",
            f"/v1/compliance/{ID18}/2026",
            "1.1",
            200,
        )
    finally:
        logger.removeHandler(handler)
    out = stream.getvalue()
    assert ID18 not in out
    assert "GET /v1/compliance/630102********9126/2026 HTTP/1.1" in out
    assert "200" in out


def test_filter_leaves_clean_records_alone() -> None:
    record = logging.makeLogRecord({"msg": "%s rows", "args": (5,)})
    assert MaskingFilter().filter(record) is True
    assert record.args == (5,)
    assert record.getMessage() == "5 rows"


def test_filter_survives_a_broken_format_string() -> None:
    record = logging.makeLogRecord({"msg": "%d for " + ID18, "args": ("x",)})
    assert MaskingFilter().filter(record) is True
    assert ID18 not in record.getMessage()


def test_install_log_masking_is_idempotent() -> None:
    root = logging.getLogger()
    handler = logging.StreamHandler(io.StringIO())
    root.addHandler(handler)
    try:
        install_log_masking()
        install_log_masking()
        assert sum(isinstance(f, MaskingFilter) for f in handler.filters) == 1
        for name in ("uvicorn", "uvicorn.access", "uvicorn.error"):
            logger = logging.getLogger(name)
            assert sum(isinstance(f, MaskingFilter) for f in logger.filters) == 1
    finally:
        root.removeHandler(handler)
        for name in ("uvicorn", "uvicorn.access", "uvicorn.error"):
            logger = logging.getLogger(name)
            for f in [f for f in logger.filters if isinstance(f, MaskingFilter)]:
                logger.removeFilter(f)


def test_an_edit_diff_is_masked_without_breaking_its_structure() -> None:
    """Found by schemathesis: masking the JSON text of a nested edit made it unparseable (500)."""
    from gateway.ops.common import apply_changes

    raw = {"person": {"name": "张三"}}
    changes = {"person.name": {"x": [1.281222711694111e16, "630102199001011234"], "y": True}}
    _, diff = apply_changes(raw, changes)
    [entry] = diff
    assert entry["to"]["y"] is True and isinstance(entry["to"]["x"], list)
    assert "630102199001011234" not in str(entry) and "1234" in entry["to"]["x"][1]


@pytest.mark.parametrize("start", range(170, 205))
def test_an_excerpt_cut_across_an_identity_number_shows_no_more_than_its_mask(start: int) -> None:
    """A partner's error body is cut to 200 characters, masked before the cut.

    Masking after the cut left up to 17 digits of a number that straddled it, too few for
    ``mask_text`` to recognise.
    """
    id_number = "630102198704139126"
    body = "x" * start + f"id {id_number} refused" + "y" * 300
    excerpt = mask_excerpt(body)
    assert len(excerpt) == 200
    # No 7 digits of the number survive together: its mask shows the first 6 and the last 4.
    leaked = [id_number[i:i + 7] for i in range(len(id_number) - 6) if id_number[i:i + 7] in excerpt]
    assert leaked == []


def test_cutting_before_masking_leaks_what_mask_excerpt_hides() -> None:
    """The failure mask_excerpt exists for: the old order kept 12 digits here."""
    body = "x" * 191 + "630102198704139126"
    assert "630102198" in mask_text(body[:200])
    assert "630102198" not in mask_excerpt(body)


@pytest.mark.parametrize(("text", "redacted"), [
    ('HTTP Request: POST http://robot:Dr0wssap@ce:8780/v1/x "HTTP/1.1 200 OK"',
     'HTTP Request: POST http://***@ce:8780/v1/x "HTTP/1.1 200 OK"'),
    ("https://qyapi.weixin.qq.com/cgi-bin/webhook/send?key=693a91f6",
     "https://qyapi.weixin.qq.com/cgi-bin/webhook/send?key=***"),
    ("GET https://h/robot/send?access_token=t&since=2026 done", "GET https://h/robot/send?access_token=***&since=*** done"),
    ("http://h/p?bare-token", "http://h/p?***"),
    ("no url, user@example.org", "no url, user@example.org"),
    # Prose around a URL stays: a bracket and comma after it, an ``&`` in its path, a fragment.
    ("failed (GET http://h/p?key=s3cret), retrying", "failed (GET http://h/p?key=***), retrying"),
    ("see http://h/a&b/c?x=1.", "see http://h/a&b/c?x=***."),
    ("http://h/p?a=1&b#frag", "http://h/p?a=***&***#frag"),
    ("http://h/wiki/A_(b)?t=1", "http://h/wiki/A_(b)?t=***"),
    ("[http://u:pw@h/x]", "[http://***@h/x]"),
])
def test_redact_urls_stars_userinfo_and_query_values(text: str, redacted: str) -> None:
    assert redact_urls(text) == redacted


@pytest.mark.parametrize(("text", "redacted"), [
    # A fragment's values, as a query's: an OAuth implicit grant's token, a router's query.
    ("http://h/cb#access_token=abc", "http://h/cb#access_token=***"),
    ("redirect http://h/cb#access_token=abc&state=xyz&expires_in=3600.",
     "redirect http://h/cb#access_token=***&state=***&expires_in=***."),
    ("http://h/p?a=1#token=T0k", "http://h/p?a=***#token=***"),
    ("http://h/#/login?token=T0k", "http://h/#/login?token=***"),
    ("(see http://h/cb#access_token=abc), then", "(see http://h/cb#access_token=***), then"),
    # A secret-named pair in the path, with no ``?`` (or before it).
    ("http://h/cb;token=abc", "http://h/cb;token=***"),
    ("GET http://h/cb&token=abc done", "GET http://h/cb&token=*** done"),
    ("http://h/a;jsessionid=S1D/b?x=1", "http://h/a;jsessionid=***/b?x=***"),
    ("http://h/send&access_token=abc&sig=s1g;", "http://h/send&access_token=***&sig=***;"),
    ("http://h/x;Client-Secret=s3;Password=pw", "http://h/x;Client-Secret=***;Password=***"),
    ("http://h/api_key=K/v", "http://h/api_key=***/v"),
    ("[http://h/cb;signature=abc]", "[http://h/cb;signature=***]"),
    # What is not a secret pair in the path stays, an ``&`` and a fragment anchor too.
    ("see http://h/a&b/c.", "see http://h/a&b/c."),
    ("http://h/a&page=2;lang=zh/x", "http://h/a&page=2;lang=zh/x"),
    ("http://h/monkey=1;keyword=x", "http://h/monkey=1;keyword=x"),
    ("http://h/doc#section-2", "http://h/doc#section-2"),
    ("http://h/doc#/route", "http://h/doc#/route"),
])
def test_redact_urls_stars_fragment_values_and_secret_path_pairs(text: str, redacted: str) -> None:
    assert redact_urls(text) == redacted


def test_httpx_request_lines_are_logged_without_url_credentials() -> None:
    """The request line httpx logs at INFO (``HTTP Request: POST <URL> …``, the URL an object)."""
    import httpx

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger("httpx")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        install_log_masking()
        transport = httpx.MockTransport(lambda request: httpx.Response(200))
        with httpx.Client(transport=transport) as client:
            client.get("http://robot:Dr0wssap@ce.internal/v1/ref?key=K3y")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert "ce.internal/v1/ref?key=***" in stream.getvalue()
    assert "Dr0wssap" not in stream.getvalue() and "K3y" not in stream.getvalue()
