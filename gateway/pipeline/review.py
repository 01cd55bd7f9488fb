"""Who reviews a record (SPEC §4 R13): the review authority table of the notice's appendix.

Pure: a person (and the CE year) in, an office out; no I/O.  The fifteen offices are the
appendix "各市州及自审单位继续教育政策咨询联系方式" of 青人社厅函〔2022〕394号; three more
are needed to route every record: the publishing and news authorities of 七(一), and the
provincial HR department for people outside the eight prefectures (province-level units,
援青人员 registered elsewhere).

Precedence (七(四)4 names all three kinds of reviewer): a self-reviewing unit reviews its own
staff ("自主审核单位（青海大学、青海师范大学、青海民族大学、青海开放大学、青海日报社）"); then the
industries that manage their own training ("自主培训管理行业（省卫健委、省财政厅）") and, under
七(一), publishing (from 2022) and news (from 2023); everyone else goes to the HR bureau of the
prefecture of their region code ("各级人社部门").
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType

from contracts import Person

__all__ = [
    "FALLBACK",
    "OFFICES",
    "OFFICE_BY_CODE",
    "PREFECTURE_OF_PREFIX",
    "Office",
    "Route",
    "review_authority",
    "route",
]


class Route(StrEnum):
    EMPLOYER = "employer"  # a self-reviewing unit, by person.employer_name
    INDUSTRY = "industry"  # by person.industry (or the adapter's industry)
    PREFECTURE = "prefecture"  # by the first four digits of person.region_code
    FALLBACK = "fallback"  # nobody else: the provincial HR department


@dataclass(frozen=True)
class Office:
    code: str
    name_zh: str
    division_zh: str | None
    phone: str | None
    route: Route
    keys: tuple[str, ...]  # region codes, industries or employer names routed here
    route_zh: str  # how a record gets here, in words
    seq: int | None = None  # 序号 in the appendix; None for offices outside it
    since: int | None = None  # first CE year the route applies


def _hrb(seq: int, region: str, name: str, division: str, phone: str) -> Office:
    return Office(f"HRB-{region}", name, division, phone, Route.PREFECTURE, (region,),
                  f"地区代码属{name[:-3]}（{region}）的其他专业技术人员", seq)


_UNIT = "本单位专业技术人员（按工作单位名称识别）"
OFFICES: tuple[Office, ...] = (
    # 附件 1–8: 各市州人社局, by region code
    _hrb(1, "630100", "西宁市人社局", "事业单位人事管理科", "0971-6163992"),
    _hrb(2, "630200", "海东市人社局", "专业技术人员管理科", "0972-8666268"),
    _hrb(3, "632200", "海北州人社局", "事业单位人事管理科", "0970-8643779"),
    _hrb(4, "632500", "海南州人社局", "事业单位人事管理科", "0974-8512774"),
    _hrb(5, "632800", "海西州人社局", "事业单位人事管理科", "0977-8222882"),
    _hrb(6, "632300", "黄南州人社局", "事业单位人事管理科", "0973-8722188"),
    _hrb(7, "632700", "玉树州人社局", "事业单位人事管理科", "0976-8826922"),
    _hrb(8, "632600", "果洛州人社局", "事业单位人事管理科", "0975-8384835"),
    # 附件 9–10: 自主培训管理行业 (七(四)4), by industry
    Office("QH-HEALTH", "省卫健委", "科教处", "0971-8237169", Route.INDUSTRY, ("health",),
           "卫生专业技术人员（industry=health）", 9),
    Office("QH-FINANCE", "省财政厅", "会计管理处", "0971-3660259", Route.INDUSTRY,
           ("accounting",), "会计人员（industry=accounting）", 10),
    # 附件 11–15: 自主审核单位 (七(四)4), by employer name
    Office("QHDAILY", "青海日报社", "人事处", "0971-8457677", Route.EMPLOYER, ("青海日报社",),
           _UNIT, 11),
    Office("QHU", "青海大学", "人事处", "0971-5310407", Route.EMPLOYER, ("青海大学",), _UNIT, 12),
    Office("QHNU", "青海师范大学", "人事处", "0971-6317924", Route.EMPLOYER, ("青海师范大学",),
           _UNIT, 13),
    Office("QHMU", "青海民族大学", "人事处", "0971-8803704", Route.EMPLOYER, ("青海民族大学",),
           _UNIT, 14),
    # 青海广播电视大学 was renamed 青海开放大学; employer names still carry the old one.
    Office("QHOU", "青海开放大学", "人事处", "0971-6367586", Route.EMPLOYER,
           ("青海开放大学", "青海广播电视大学"), _UNIT, 15),
    # 七(一): "出版行业…按照…（国新出发〔2020〕18号）执行" from 2022, "新闻行业…（国新出发〔2022〕
    # 8号）执行" from 2023; "各级宣传、广电部门…按照管理权限对出版、新闻行业专业技术人员学时管理、
    # 学时审核工作的真实性、规范性和严肃性负全部责任"
    Office("QH-PUBLISHING", "宣传部门（出版，国新出发〔2020〕18号）", None, None, Route.INDUSTRY,
           ("publishing",), "出版专业技术人员（industry=publishing），2022年起", since=2022),
    Office("QH-NEWS", "宣传、广电部门（新闻，国新出发〔2022〕8号）", None, None, Route.INDUSTRY,
           ("news",), "新闻专业技术人员（industry=news），2023年起", since=2023),
    Office("QH-HRSS", "青海省人力资源和社会保障厅", None, "8258156", Route.FALLBACK, (),
           "地区代码不属八个市州（省直单位、外省地区代码）"),
)
OFFICE_BY_CODE: Mapping[str, Office] = MappingProxyType({o.code: o for o in OFFICES})
FALLBACK = OFFICE_BY_CODE["QH-HRSS"]

# First four digits of a region code → prefecture office.  6321 is Haidong's code before it
# became a city in 2013 (海东地区 632100); ids and registrations still carry it.
PREFECTURE_OF_PREFIX: Mapping[str, Office] = MappingProxyType({
    **{o.keys[0][:4]: o for o in OFFICES if o.route is Route.PREFECTURE},
    "6321": OFFICE_BY_CODE["HRB-630200"],
})
_INDUSTRY: Mapping[str, Office] = MappingProxyType(
    {key: o for o in OFFICES if o.route is Route.INDUSTRY for key in o.keys})
_EMPLOYERS: tuple[tuple[str, Office], ...] = tuple(sorted(
    ((key, o) for o in OFFICES if o.route is Route.EMPLOYER for key in o.keys),
    key=lambda pair: -len(pair[0])))
# Separate institutions that carry a university's name: their staff are not its staff.
_AFFILIATES = ("附属", "昆仑学院")
_NOISE = re.compile(r"[\s\"'“”‘’「」《》]")
# An adapter whose records are all of one industry, for records that do not say it.
ADAPTER_INDUSTRY: Mapping[str, str] = MappingProxyType(
    {"health": "health", "finance": "accounting"})


def _fold(text: str) -> str:
    return _NOISE.sub("", unicodedata.normalize("NFKC", text))


def _by_employer(person: Person, year: int, adapter: str) -> Office | None:
    name = _fold(person.employer_name or "")
    for key, office in _EMPLOYERS:
        if name.startswith(key) and not name[len(key):].startswith(_AFFILIATES):
            return office
    return None


def _by_industry(person: Person, year: int, adapter: str) -> Office | None:
    industry = (person.industry or ADAPTER_INDUSTRY.get(adapter, "")).strip().lower()
    office = _INDUSTRY.get(industry)
    if office is None or (office.since is not None and year < office.since):
        return None
    return office


def _by_prefecture(person: Person, year: int, adapter: str) -> Office | None:
    return PREFECTURE_OF_PREFIX.get(person.region_code[:4])


# The routes in order of precedence (module docstring); the first that answers wins.
PRECEDENCE = (
    (Route.EMPLOYER, _by_employer),
    (Route.INDUSTRY, _by_industry),
    (Route.PREFECTURE, _by_prefecture),
)


def route(person: Person, year: int, adapter: str = "") -> Office:
    """The office that reviews this person's record for CE year ``year``."""
    for _name, match in PRECEDENCE:
        office = match(person, year, adapter)
        if office is not None:
            return office
    return FALLBACK


def review_authority(person: Person, year: int, adapter: str = "") -> str:
    """The office code of :func:`route`."""
    return route(person, year, adapter).code
