"""R13: who reviews a record — the fifteen offices of the notice's appendix, and the rest."""

from __future__ import annotations

import pytest

from contracts import Person
from gateway.pipeline.review import (
    FALLBACK,
    OFFICE_BY_CODE,
    OFFICES,
    PREFECTURE_OF_PREFIX,
    Route,
    review_authority,
    route,
)

ID = "630102198704139126"


def person(region: str = "630102", employer: str | None = None,
           industry: str | None = None) -> Person:
    return Person(id_number=ID, name="赵伟", region_code=region, employer_name=employer,
                  industry=industry)


# 附件 "各市州及自审单位继续教育政策咨询联系方式", rows 1–15 as the notice lists them.
APPENDIX = [
    (1, "西宁市人社局", "事业单位人事管理科"), (2, "海东市人社局", "专业技术人员管理科"),
    (3, "海北州人社局", "事业单位人事管理科"), (4, "海南州人社局", "事业单位人事管理科"),
    (5, "海西州人社局", "事业单位人事管理科"), (6, "黄南州人社局", "事业单位人事管理科"),
    (7, "玉树州人社局", "事业单位人事管理科"), (8, "果洛州人社局", "事业单位人事管理科"),
    (9, "省卫健委", "科教处"), (10, "省财政厅", "会计管理处"), (11, "青海日报社", "人事处"),
    (12, "青海大学", "人事处"), (13, "青海师范大学", "人事处"), (14, "青海民族大学", "人事处"),
    (15, "青海开放大学", "人事处"),
]


def test_the_table_holds_the_appendix_fifteen() -> None:
    listed = sorted((o.seq, o.name_zh, o.division_zh) for o in OFFICES if o.seq is not None)
    assert listed == APPENDIX
    assert len({o.code for o in OFFICES}) == len(OFFICES)
    assert all(o.route_zh for o in OFFICES)


# One person per office, routed by the rule that sends them there.
@pytest.mark.parametrize(("who", "year", "code"), [
    (person("630102"), 2026, "HRB-630100"),  # 西宁市城东区
    (person("630202"), 2026, "HRB-630200"),  # 海东市乐都区
    (person("632222"), 2026, "HRB-632200"),  # 海北州祁连县
    (person("632521"), 2026, "HRB-632500"),  # 海南州共和县
    (person("632801"), 2026, "HRB-632800"),  # 海西州格尔木市
    (person("632321"), 2026, "HRB-632300"),  # 黄南州同仁市
    (person("632701"), 2026, "HRB-632700"),  # 玉树州玉树市
    (person("632621"), 2026, "HRB-632600"),  # 果洛州玛沁县
    (person("632801", industry="health"), 2026, "QH-HEALTH"),
    (person("632123", industry="accounting"), 2026, "QH-FINANCE"),
    (person("630103", employer="青海日报社"), 2026, "QHDAILY"),
    (person("630104", employer="青海大学"), 2026, "QHU"),
    (person("630104", employer="青海师范大学"), 2026, "QHNU"),
    (person("630104", employer="青海民族大学"), 2026, "QHMU"),
    (person("630104", employer="青海开放大学"), 2026, "QHOU"),
])
def test_each_office_is_reached(who: Person, year: int, code: str) -> None:
    assert review_authority(who, year) == code
    assert code in OFFICE_BY_CODE and OFFICE_BY_CODE[code].seq is not None


def test_every_appendix_office_is_reachable_by_its_own_keys() -> None:
    for office in OFFICES:
        if office.route is Route.PREFECTURE:
            who = person(office.keys[0])
        elif office.route is Route.INDUSTRY:
            who = person("630102", industry=office.keys[0])
        elif office.route is Route.EMPLOYER:
            who = person("630102", employer=office.keys[0])
        else:
            continue
        assert route(who, 2026) == office, office.code


@pytest.mark.parametrize(("employer", "industry", "code"), [
    ("青海大学医学院", None, "QHU"),  # a school of the university: its own staff
    ("青 海 大 学 农牧学院", None, "QHU"),
    ("青海广播电视大学", None, "QHOU"),  # the open university's former name
    ("青海大学", "health", "QHU"),  # a self-reviewing unit reviews its own staff first
    ("青海日报社", "news", "QHDAILY"),
    ("青海大学附属医院", "health", "QH-HEALTH"),  # an affiliated hospital is not the university
    ("青海大学附属医院", None, "HRB-630100"),
    ("青海大学昆仑学院", None, "HRB-630100"),  # an independent college
    ("西宁市第一人民医院", "health", "QH-HEALTH"),
    ("西宁市某会计师事务所", "ACCOUNTING", "QH-FINANCE"),
    ("西宁市第十四中学", None, "HRB-630100"),
])
def test_employer_then_industry_then_prefecture(employer: str, industry: str | None,
                                                code: str) -> None:
    assert review_authority(person("630102", employer, industry), 2026) == code


@pytest.mark.parametrize(("industry", "year", "code"), [
    ("publishing", 2021, "HRB-630100"), ("publishing", 2022, "QH-PUBLISHING"),
    ("news", 2022, "HRB-630100"), ("news", 2023, "QH-NEWS"), ("news", 2026, "QH-NEWS"),
])
def test_publishing_and_news_follow_national_rules_from_2022_and_2023(
        industry: str, year: int, code: str) -> None:
    # 七(一): 出版 "自2022年起"，新闻 "自2023年起"
    assert review_authority(person("630102", industry=industry), year) == code


def test_haidong_s_pre_2013_code_and_places_outside_the_prefectures() -> None:
    assert review_authority(person("632126"), 2026) == "HRB-630200"  # 互助县, old 6321xx
    assert PREFECTURE_OF_PREFIX["6321"].code == "HRB-630200"
    assert route(person("630000"), 2026) == FALLBACK  # province-level unit
    assert review_authority(person("110101"), 2026) == "QH-HRSS"  # registered elsewhere


def test_health_and_finance_adapters_imply_their_industry() -> None:
    assert review_authority(person("630102"), 2026, "health") == "QH-HEALTH"
    assert review_authority(person("630102"), 2026, "finance") == "QH-FINANCE"
    assert review_authority(person("630102"), 2026, "canonical") == "HRB-630100"
