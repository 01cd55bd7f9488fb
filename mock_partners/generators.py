"""Seeded generators of realistic partner data: people, identity numbers, canonical records.

Everything is deterministic for a seed, so the demo and tests can name what they expect.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any

from stdnum.cn import ric

SURNAMES = "王李张刘陈杨赵黄周吴徐孙马朱胡郭何林罗高才祁韩冶星多杰"
GIVEN = ["伟", "芳", "娜", "敏", "静", "丽", "强", "磊", "军", "洋", "勇", "艳", "杰", "涛", "明",
         "卓玛", "才让", "扎西", "拉毛", "索南", "德吉", "海燕", "建国", "文华", "晓东"]
# Qinghai prefectures and a few counties (region codes of the ids and of the records).
REGIONS = ["630102", "630103", "630104", "630105", "630202", "630203", "632221", "632321",
           "632521", "632621", "632701", "632801", "632802"]
EMPLOYERS = ["西宁市第一人民医院", "海东市平安区第一中学", "青海省农林科学院", "格尔木市财政局",
             "玉树州人民医院", "青海大学附属医院", "海北州水利局", "果洛州畜牧兽医站"]
COURSES = ["高原生态修复技术研修班", "现代农牧业技术培训", "临床医学新进展", "会计准则专题",
           "数字政府建设实务", "三江源生态保护专题", "高原医学专题讲座", "工程项目管理实务"]


def make_id_number(rng: random.Random, region: str | None = None, born: date | None = None) -> str:
    region = region or rng.choice(REGIONS)
    born = born or date(1965, 1, 1) + timedelta(days=rng.randrange(365 * 35))
    body = f"{region}{born:%Y%m%d}{rng.randrange(1000):03d}"
    # stdnum wants the number with a placeholder check digit (it ignores the last one).
    return body + ric.calc_check_digit(body + "0")


def corrupt_check_digit(id_number: str) -> str:
    last = id_number[-1]
    return id_number[:-1] + ("1" if last != "1" else "2")


@dataclass(frozen=True)
class GenPerson:
    id_number: str
    name: str
    employer: str
    region: str


def make_person(rng: random.Random) -> GenPerson:
    region = rng.choice(REGIONS)
    return GenPerson(make_id_number(rng, region), rng.choice(SURNAMES) + rng.choice(GIVEN),
                     rng.choice(EMPLOYERS), region[:4] + "00" if region[:4] != "6301" else "630100")


def canonical_submission(rng: random.Random, source_id: str, person: GenPerson | None = None,
                         year: int = 2026, hours: str | None = None,
                         title: str | None = None,
                         within: tuple[date, date] | None = None) -> dict[str, Any]:
    """One offline training record, dated in ``year`` or, if given, ``within`` a plan's period.

    Pass the plan's (starts_on, ends_on) for a record that will name that plan: R14 flags one
    dated outside it (INTEGRITY_OUTSIDE_PLAN).
    """
    person = person or make_person(rng)
    first, days = (within[0], (within[1] - within[0]).days - 2) if within else (date(year, 1, 5), 300)
    start = first + timedelta(days=rng.randrange(days))
    end = start + timedelta(days=rng.randrange(4))  # at most 3 days on: within[1] at the latest
    return {
        "source_record_id": source_id,
        "person": {"id_type": "resident_id", "id_number": person.id_number, "name": person.name,
                   "employer_name": person.employer, "region_code": person.region},
        "year": year, "category": "professional", "activity_type": "training",
        "activity": {"title": title or rng.choice(COURSES), "mode": "offline",
                     "started_on": start.isoformat(), "completed_on": end.isoformat()},
        "claimed": {"quantity": hours or str(rng.choice([8, 12, 16, 24, 32, 40])), "unit": "hours",
                    "details": {}},
        "evidence": {"certificate_no": f"QH{year}{rng.randrange(10**6):06d}", "assessment": "passed"},
    }
