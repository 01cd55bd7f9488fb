"""The data the policy rules decide with (SPEC §4): conversion tables, exclusions, the config.

Pure data and small value types, no I/O: the tables, :class:`RulesConfig`, and the reference
data types with the :class:`Reference` protocol (plus an empty and an in-memory reference).  :mod:`gateway.pipeline.rules` holds the rule table
R1–R14 and :func:`~gateway.pipeline.rules.judge`, and re-exports what callers need from here.
Every number carries the notice clause it comes from (青人社厅函〔2022〕394号, "the notice").
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal
from functools import lru_cache
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Protocol
from zoneinfo import ZoneInfo

from contracts import ActivityType, Unit

if TYPE_CHECKING:
    from gateway.config import Settings
    from gateway.person_keys import PersonKeys

NOTICE = "青人社厅函〔2022〕394号"

# R1 — 四: "专业技术人员参加继续教育的学时不少于 135 学时，其中公需科目不少于 45 学时，
# 专业科目不少于 90 学时。"
REQUIREMENT: Mapping[str, int] = MappingProxyType({"total": 135, "public": 45, "professional": 90})

# R2 — 三: "公需科目采取线上培训方式，学员登录青海干部网络学院培训平台自主学习。"  一: "全省卫生
# 专业技术人员、会计人员分别按照省级行业主管部门安排部署参加培训。" → their pushes may carry public.
PUBLIC_SOURCES = frozenset({"cadre_college", "health", "finance"})

# R9 — which adapters' records come from a CE base (六(三) 目录清单).  A provider_code on any
# other adapter's record names a base too, except the Cadre Network College's own code.
BASE_ADAPTERS = frozenset({"training_base"})
NOT_BASE_PROVIDERS = frozenset({"cadre_college", "health", "finance"})

# The activity kinds whose hours the notice converts, and the units each may be claimed in.
# Types the notice leaves to 青人社厅函〔2020〕227号 (四(二)) count hours as claimed, or credits
# by the credit table.
_TIME = frozenset({Unit.HOURS, Unit.CREDITS})
ALLOWED_UNITS: Mapping[ActivityType, frozenset[Unit]] = MappingProxyType({
    ActivityType.ONLINE_COURSE: _TIME,
    ActivityType.TRAINING: _TIME,
    ActivityType.SELF_STUDY: _TIME,
    ActivityType.MENTORING: _TIME,
    ActivityType.INNOVATION: _TIME,
    ActivityType.PAPER: frozenset({Unit.PAPERS}),
    ActivityType.BOOK: frozenset({Unit.BOOKS}),
    ActivityType.LECTURE: frozenset({Unit.LECTURE_HOURS, Unit.HOURS}),
    ActivityType.EXAM_SETTING: frozenset({Unit.HOURS}),
    ActivityType.COMPETITION: frozenset({Unit.AWARD}),
})

# R14 (诚信学习, 青人社厅函〔2022〕394号 六(一)): the kinds whose claimed hours are time spent, so
# they fill a person's days.  An exam setter's or innovator's hours are credit granted, and a
# paper, book or award is no time at all.
TIME_ACTIVITIES = frozenset({ActivityType.ONLINE_COURSE, ActivityType.TRAINING,
                             ActivityType.SELF_STUDY, ActivityType.MENTORING,
                             ActivityType.LECTURE})


@dataclass(frozen=True)
class Rate:
    """Hours per unit, with the clause (and its Chinese label) that sets it."""

    hours: Decimal
    label_en: str
    label_zh: str
    clause: str


# R3 — 四(二)1: "…学术论文（独著），每篇折算 10 学时；与他人合作发表的，每人每篇折算为 5 学时"
PAPER_HOURS: Mapping[str, Rate] = MappingProxyType({
    "sole": Rate(Decimal(10), "paper, sole author", "学术论文（独著）", "四(二)1"),
    "co": Rate(Decimal(5), "paper, co-author", "学术论文（合作发表）", "四(二)1"),
})
# R4 — 四(二)2: "每部著作折算 30 学时；合著出版的，第一作者每部著作折算 20 学时，其他作者每人每部
# 著作折算 10 学时"
BOOK_HOURS: Mapping[str, Rate] = MappingProxyType({
    "sole": Rate(Decimal(30), "book, sole author", "学术著作（独著）", "四(二)2"),
    "first": Rate(Decimal(20), "book, first author", "学术著作（合著第一作者）", "四(二)2"),
    "other": Rate(Decimal(10), "book, other author", "学术著作（合著其他作者）", "四(二)2"),
})

# R3–R6 caps, per person-year: the activity types a cap applies to, and the clause.
CAP_TYPE_OF: Mapping[ActivityType, str] = MappingProxyType({
    ActivityType.PAPER: "paper",
    ActivityType.BOOK: "book",
    ActivityType.LECTURE: "lecture",
    ActivityType.EXAM_SETTING: "exam_setting",
})
CAP_CLAUSE: Mapping[str, tuple[str, str]] = MappingProxyType({
    "paper": ("四(二)1", "每年最多折算为 20 学时"),
    "book": ("四(二)2", "每年最多折算为 40 学时"),
    "lecture": ("四(二)3", "每年最多折算为 30 学时"),
    "exam_setting": ("四(二)4", "当年最多折算为 30 学时"),
})
CAP_LABEL_ZH: Mapping[str, str] = MappingProxyType(
    {"paper": "学术论文", "book": "学术著作", "lecture": "专题授课", "exam_setting": "考试命题"})


@dataclass(frozen=True)
class Award:
    """What one competition result is worth (R7)."""

    hours: Decimal
    covers_professional_requirement: bool
    quote: str  # the notice's words for this row, 四(二)5


# R7 — 四(二)5.  Prize ranks and medals are read as equivalent (三等奖以上 ≡ bronze or above):
# the notice names prizes for some tiers and medals for others, and partners send either.
TIERS = ("national", "national_industry", "provincial", "provincial_joint", "prefecture")
AWARDS = ("first", "second", "third", "gold", "silver", "bronze", "excellence")
_TOP3 = ("first", "second", "third", "gold", "silver", "bronze")
_COMPETITION_ROWS: tuple[tuple[str, tuple[str, ...], Award], ...] = (
    ("national", (*_TOP3, "excellence"), Award(
        Decimal(90), True, "参加全国职业技能大赛获得优胜奖以上奖项的，折算为任职期间全部专业课学时")),
    ("national_industry", _TOP3, Award(
        Decimal(90), False, "参加全国单一行业部门举办的职业技能大赛获得三等奖以上…当年折算 90 学时")),
    ("national_industry", ("excellence",), Award(
        Decimal(60), False, "获得优胜奖的人员，当年折算 60 学时")),
    ("provincial", _TOP3, Award(
        Decimal(90), False,
        "参加青海省职业技能大赛、青海省技工院校教师职业能力大赛获得金银铜牌的人员，当年折算 90 学时")),
    ("provincial", ("excellence",), Award(
        Decimal(60), False, "获得优胜奖的人员，当年折算 60 学时")),
    ("provincial_joint", _TOP3, Award(
        Decimal(60), False,
        "参加由省级人社部门会同行业部门举办的职业技能大赛，获得三等奖以上的，当年折算 60 学时")),
    ("provincial_joint", ("excellence",), Award(
        Decimal(40), False, "获得优胜奖的，当年折算 40 学时")),
    ("prefecture", _TOP3, Award(
        Decimal(30), False,
        "参加市州、省级单一行业部门举办的职业技能大赛或职业能力大赛获得三等奖以上的，当年折算 30 学时")),
)
COMPETITION: Mapping[tuple[str, str], Award] = MappingProxyType(
    {(tier, award): row for tier, awards, row in _COMPETITION_ROWS for award in awards})

# R8 — 四(二): "参加各类考前辅导、事业单位新进人员岗前培训、“法宣在线”等不计入专业技术人员继续
# 教育培训学时，也不计入专业学时。"  details.program names the kind; else the title shows it.
EXCLUDED_PROGRAMS: Mapping[str, tuple[str, str]] = MappingProxyType({
    "exam_prep": ("exam-prep tutoring", "考前辅导"),
    "new_hire_induction": ("new-hire pre-job training in a public institution",
                           "事业单位新进人员岗前培训"),
    "fa_xuan_online": ("法宣在线 (online legal-awareness course)", "“法宣在线”"),
})
# Titles are folded first (NFKC, no spaces or quotes).  岗前培训 alone is not enough: the notice
# excludes the new hires' induction of public institutions, not every pre-job course.
EXCLUDED_TITLES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("exam_prep", re.compile(r"考前(辅导|培训)")),
    ("new_hire_induction", re.compile(r"(新进|新入职|新聘|新招聘|新录用|事业单位).*岗前培训")),
    ("fa_xuan_online", re.compile(r"法宣在线")),
)

# R11 — 七(二): the reasons a person's hours may be "顺延至下一年度合并计算".
DEFERRAL_REASONS: Mapping[str, tuple[str, str]] = MappingProxyType({
    "post_transfer": ("management-to-professional post transfer in the institutional reform",
                      "因事业单位机构改革由管理岗转换到专技岗"),
    "illness": ("serious illness", "因重大疾病"),
    "pregnancy": ("pregnancy", "因孕"),
})

# Credits → hours (SPEC §4): which rate applies, by adapter first, then by industry.
CREDIT_SOURCE_OF_ADAPTER: Mapping[str, str] = MappingProxyType(
    {"health": "health", "finance": "finance"})
CREDIT_SOURCE_OF_INDUSTRY: Mapping[str, str] = MappingProxyType(
    {"health": "health", "accounting": "finance"})
CREDIT_BASIS: Mapping[str, tuple[str, str]] = MappingProxyType({
    "health": ("CME credits; national 2024 CME rule: ≥25 credits ≈ ≥90 学时 a year",
               "继续医学教育学分；2024年全国继续医学教育规定：每年≥25学分≈≥90学时"),
    "finance": ("accounting CE credits; 财会〔2018〕10号: 90 学分 a year",
                "会计人员继续教育学分；财会〔2018〕10号：每年不少于90学分"),
})


def _mm_dd(text: str) -> tuple[int, int]:
    month, day = (int(part) for part in text.split("-"))
    date(2000, month, day)  # a leap year, so 02-29 is allowed; raises on a bad month or day
    return month, day


@lru_cache(maxsize=1024)  # asked for every record (year close, title deadline): parse once
def on(year: int, mm_dd: str) -> date:
    """``MM-DD`` in ``year``; 02-29 falls back to 02-28 in a common year."""
    month, day = _mm_dd(mm_dd)
    try:
        return date(year, month, day)
    except ValueError:
        return date(year, month, day - 1)


def _caps() -> Mapping[str, Decimal]:
    # 四(二)1–4 "每年最多折算为 20 / 40 / 30 学时", "当年最多折算为 30 学时"
    return MappingProxyType({"paper": Decimal(20), "book": Decimal(40), "lecture": Decimal(30),
                             "exam_setting": Decimal(30)})


@dataclass(frozen=True)
class RulesConfig:
    """The rules' numbers and deadlines, defaulting to the notice's values (SPEC §4)."""

    # 七(四)4 "未按规定在当年 12 月 30 日前提交学时申请的，系统将无法提交并审验" (end of day)
    year_close: str = "12-30"
    # A year the department extended (e.g. "2026 年度学时申报延期至 2027-03-31"): its own last
    # day, end of day in ``timezone``; every other year closes on ``year_close``.
    year_close_extensions: Mapping[int, date] = field(default_factory=dict, hash=False)
    # 六(五) / 七(四)2 "于每年 7 月底前完成…备案工作" — 31 July itself is in time
    plan_filing_deadline: str = "07-31"
    # 七(四)3 "当年申报职称的专业技术人员务必于 11 月底前完成当年培训"
    title_applicant_deadline: str = "11-30"
    timezone: str = "Asia/Shanghai"
    health_hours_per_credit: Decimal = Decimal("3.6")
    finance_hours_per_credit: Decimal = Decimal("1")
    caps: Mapping[str, Decimal] = field(default_factory=_caps, hash=False)
    # 四(二)3 "按当年实际授课（报告）时间的 6 倍计算学时"
    lecture_factor: Decimal = Decimal(6)
    # R14, 六(一) 诚信学习: what one person cannot do in one day, or above a filed plan
    integrity_day_limit_hours: Decimal = Decimal(24)
    integrity_plan_factor: Decimal = Decimal("1.5")
    # Who a record is about, as the store keys it (PERSON_KEY_SECRET): R10 groups, R11/R12
    # lookups and R1 totals join on it.  None (the notice's bare defaults) refuses every use:
    # a default key would file people apart from the store's (see :attr:`keys`).
    person_keys: PersonKeys | None = field(default=None, compare=False, hash=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("year_close", "plan_filing_deadline", "title_applicant_deadline"):
            try:
                _mm_dd(getattr(self, name))
            except ValueError as exc:
                raise ValueError(f"RulesConfig.{name} must be MM-DD: {exc}") from exc
        try:  # an unknown zone fails at start, not per record
            ZoneInfo(self.timezone)
        except (KeyError, ValueError) as exc:  # ZoneInfoNotFoundError is a KeyError
            raise ValueError(f"RulesConfig.timezone: unknown zone {self.timezone!r}") from exc
        object.__setattr__(self, "caps", MappingProxyType(
            {key: Decimal(value) for key, value in self.caps.items()}))
        object.__setattr__(self, "year_close_extensions", MappingProxyType(
            dict(self.year_close_extensions)))

    def closes(self, year: int) -> date:
        """The last day (end of day, ``timezone``) on which ``year``'s hours may be submitted."""
        return self.year_close_extensions.get(year) or on(year, self.year_close)

    def closed_year_counted(self, row: Any, now: datetime) -> int | None:
        """The closed CE year a stored record counts in at ``now``, if it counts in one (R11).

        ``row``: its ``status``, ``withdrawn``, ``counts_year`` and ``year`` (a row stored before
        ``counts_year`` existed counts in its own year).  What counts there stands: a partner's
        withdrawal, a failed result and an ops resolution can no longer take it back (notice
        七(四)4 "学时审验工作不得结转到下一年").
        """
        if row["status"] != "accepted" or row["withdrawn"]:
            return None
        year = int(row["counts_year"] if row["counts_year"] is not None else row["year"])
        return year if now.astimezone(self.zone).date() > self.closes(year) else None

    @classmethod
    def from_settings(cls, settings: Settings) -> RulesConfig:
        """The deployment's values (``CE_GATEWAY_YEAR_CLOSE`` …); the rest stay the notice's."""
        from gateway.person_keys import PersonKeys

        return cls(year_close=settings.year_close, timezone=settings.timezone,
                   year_close_extensions=settings.year_close_extensions,
                   plan_filing_deadline=settings.plan_filing_deadline,
                   title_applicant_deadline=settings.title_applicant_deadline,
                   health_hours_per_credit=settings.health_hours_per_credit,
                   finance_hours_per_credit=settings.finance_hours_per_credit,
                   person_keys=PersonKeys(settings.person_key_secret))

    @property
    def keys(self) -> PersonKeys:
        """The store's person keys; a config built without them cannot key a person."""
        if self.person_keys is None:
            raise RuntimeError("RulesConfig has no person keys: build it with "
                               "RulesConfig.from_settings or pass person_keys")
        return self.person_keys

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    def credit_rate(self, source: str) -> Decimal:
        return {"health": self.health_hours_per_credit,
                "finance": self.finance_hours_per_credit}[source]


# -- reference data the rules consult (synced from the management system; SPEC §4 end) --------


@dataclass(frozen=True)
class BaseInfo:
    code: str
    name: str
    level: str  # national | provincial
    status: str  # active | revoked
    assessed_on: date


@dataclass(frozen=True)
class PlanInfo:
    plan_id: str
    base_code: str
    title: str
    category: str  # public | professional
    hours: Decimal
    starts_on: date
    ends_on: date
    filed_on: date


@dataclass(frozen=True)
class DeferralInfo:
    from_year: int
    reason: str  # post_transfer | illness | pregnancy
    approved_on: date


class Reference(Protocol):
    """Read access to the versioned reference data; implemented over the store elsewhere."""

    @property
    def version(self) -> str: ...

    def base(self, code: str) -> BaseInfo | None: ...

    def plan(self, plan_id: str) -> PlanInfo | None: ...

    def deferral(self, id_number: str, year: int) -> DeferralInfo | None: ...

    def is_title_applicant(self, id_number: str, year: int) -> bool: ...


class EmptyReference:
    """No bases, plans, deferrals or title applicants (version ``"empty"``)."""

    version = "empty"

    def base(self, code: str) -> BaseInfo | None:
        return None

    def plan(self, plan_id: str) -> PlanInfo | None:
        return None

    def deferral(self, id_number: str, year: int) -> DeferralInfo | None:
        return None

    def is_title_applicant(self, id_number: str, year: int) -> bool:
        return False


@dataclass
class StaticReference:
    """In-memory reference data, for tests and the demo."""

    bases: dict[str, BaseInfo] = field(default_factory=dict)
    plans: dict[str, PlanInfo] = field(default_factory=dict)
    deferrals: dict[tuple[str, int], DeferralInfo] = field(default_factory=dict)
    title_applicants: set[tuple[str, int]] = field(default_factory=set)
    version: str = "static"

    def base(self, code: str) -> BaseInfo | None:
        return self.bases.get(code)

    def plan(self, plan_id: str) -> PlanInfo | None:
        return self.plans.get(plan_id)

    def deferral(self, id_number: str, year: int) -> DeferralInfo | None:
        return self.deferrals.get((id_number, year))

    def is_title_applicant(self, id_number: str, year: int) -> bool:
        return (id_number, year) in self.title_applicants
