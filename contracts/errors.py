"""The error- and warning-code catalogue of SPEC §6, with Chinese and English messages.

Codes are stable: extend, never rename.  ``docs/error-codes.md`` is generated from this table
(``python -m contracts.export``) and a test fails when the two drift.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Severity(StrEnum):
    ERROR = "error"
    WARNING = "warning"


@dataclass(frozen=True)
class CodeInfo:
    code: str
    severity: Severity
    http_status: int | None
    message_en: str
    message_zh: str
    # Another status the same code answers with, and where (docs/error-codes.md shows it).
    other_status: str = ""


def _e(code: str, status: int | None, en: str, zh: str, other_status: str = "") -> CodeInfo:
    return CodeInfo(code, Severity.ERROR, status, en, zh, other_status)


def _w(code: str, en: str, zh: str) -> CodeInfo:
    return CodeInfo(code, Severity.WARNING, None, en, zh)


CATALOGUE: dict[str, CodeInfo] = {
    c.code: c
    for c in (
        _e("SCHEMA", 422, "The record does not match the contract.", "记录不符合数据规范。"),
        _e("ID_NUMBER_INVALID", 422, "The identity number is not valid (GB 11643 check digit or birth date).",
           "身份证号码无效（GB 11643 校验码或出生日期错误）。"),
        _e("REGION_UNKNOWN", 422, "The region code is not a known administrative division.",
           "地区代码不是已知的行政区划代码。"),
        _e("PUBLIC_SUBJECT_SOURCE", 422, "Public-subject hours are only accepted from the Cadre Network College.",
           "公需科目学时只能来自青海干部网络学院。"),
        _e("ACTIVITY_NOT_COUNTABLE", 422, "This activity does not count towards continuing education.",
           "该活动不计入继续教育学时。"),
        _e("BASE_NOT_RECOGNIZED", 422, "The training base is not in the directory of assessed bases, or was revoked.",
           "培训基地不在评估认定的目录清单内，或已被撤销。"),
        _e("PLAN_NOT_FILED", 422, "The training plan was not filed by the filing deadline (31 July of the year unless configured otherwise).",
           "培训计划未在备案截止日期前备案（默认为当年7月31日）。"),
        _e("ASSESSMENT_FAILED", 422, "The assessment was failed; no hours are earned.",
           "考核不合格，不计学时。"),
        _e("OUTSIDE_YEAR", 422, "The completion date lies outside the continuing-education year.",
           "完成日期不在该继续教育年度内。"),
        _e("YEAR_CLOSED", 422, "The continuing-education year is closed for new records.",
           "该继续教育年度已关闭，不再接收记录。",
           other_status="409 from `POST /v1/conflicts/{record_id}/resolve` keeping a report "
                        "against a record that counts in a closed year"),
        _e("SCOPE_VIOLATION", 403, "The partner may not submit for this adapter or base code.",
           "合作方无权以该适配器或基地代码提交数据。"),
        _e("CONFLICT_WITH_EXISTING", None, "Another source already reported this activity with different hours; held for review.",
           "其他来源已报送同一活动但学时不同，已暂停待运维处理。"),
        _e("DOWNSTREAM_REJECTED", None, "The management system rejected the record.",
           "继续教育管理系统拒收该记录。"),
        _e("RETRIES_EXHAUSTED", None, "Delivery failed after all scheduled retries.",
           "按计划重试后仍未送达。"),
        _e("UNAUTHENTICATED", 401, "The request is not signed, badly signed or stale.",
           "请求未签名、签名错误或已过期。"),
        _e("REPLAYED", 401, "The request nonce was already used.", "请求随机数已被使用（重放）。"),
        _e("PAYLOAD_TOO_LARGE", 413, "The request body or batch is too large.", "请求体或批次过大。"),
        _e("RATE_LIMITED", 429, "Too many requests from this partner; retry after the Retry-After seconds.",
           "该合作方请求过于频繁，请在 Retry-After 指定的秒数后重试。"),
        _e("NOT_FOUND", 404, "No such resource.", "资源不存在。"),
        _e("METHOD_NOT_ALLOWED", 405, "This path does not answer this HTTP method; the Allow header names the ones it does.",
           "该路径不支持此请求方法，可用的方法列于响应头中。"),
        _e("FORBIDDEN", 403, "The operator's role does not allow this action.", "操作员角色无权执行此操作。"),
        _e("NOT_A_CONFLICT", 409, "The record is not an open conflict; there is nothing to resolve.",
           "该记录不是待处理的冲突记录，无需处理。"),
        _e("NOT_EDITABLE", 409, "Only a dead delivery's current version or an open rejection can be edited.",
           "只能修改投递失败（死信）记录的当前版本或未处理的拒收记录。"),
        _e("RECORD_CHANGED", 409,
           "The record changed after it was shown (a newer version is current); look at it again before acting.",
           "该记录在显示之后已有新版本，请重新查看后再操作。"),
        _e("CONTROL_TOTALS_MISMATCH", None,
           "The file does not match its declared control totals (X-CE-Row-Count, X-CE-Total-Credits); nothing in it was taken.",
           "文件与申报的控制总数（X-CE-Row-Count、X-CE-Total-Credits）不符，文件内容均未接收。"),
        _e("PULL_FAILED", None, "The pull from the Cadre Network College stopped; the next run resumes at the stored cursor.",
           "从干部网络学院拉取数据中断，下次运行将从已保存的游标处继续。"),
        _e("BATCH_FAILED", None, "The batch could not be processed; the rows not yet counted were not taken.",
           "批次处理失败，尚未计入的行未被接收。"),
        # The command line's own refusals at start (exit 2); never an HTTP answer.
        _e("CONFIG_INVALID", None, "A CE_GATEWAY_ setting has a value the gateway cannot work with; nothing was done.",
           "CE_GATEWAY_ 配置项的取值无法使用，未执行任何操作。"),
        _e("STORE_UNAVAILABLE", None, "The store named by CE_GATEWAY_DATABASE_URL cannot be reached; nothing was done.",
           "无法连接 CE_GATEWAY_DATABASE_URL 所指的数据存储，未执行任何操作。"),
        _e("STORE_NOT_MIGRATED", None,
           "The store named by CE_GATEWAY_DATABASE_URL is behind this release's migrations: run `ce-gateway db upgrade` first; nothing was done.",
           "CE_GATEWAY_DATABASE_URL 所指的数据存储尚未迁移到本版本：请先运行 `ce-gateway db upgrade`，未执行任何操作。"),
        _w("TITLE_APPLICANT_LATE", "Title applicants must finish by the deadline (30 November unless configured otherwise).",
           "申报职称人员须在截止日期前完成学习（默认为11月30日）。"),
        _w("CAP_APPLIED", "Hours were reduced to the yearly cap for this activity type.",
           "已按该类活动年度上限核减学时。"),
        _w("NOT_COUNTED", "This version counts no hours: the management system is told so, replacing the counted version it holds.",
           "本版本不计学时：已通知管理系统，以取代其持有的已计学时版本。"),
        _w("ID_REGION_UNKNOWN", "The identity number's region prefix is not in today's code list.",
           "身份证号码的地区码不在现行代码表中。"),
        _w("USCC_INVALID", "The unified social credit code fails its check digit or is not an 18-character code.",
           "统一社会信用代码校验位错误或不是18位代码。"),
        _w("INTEGRITY_DAY_OVER_24H", "More than 24 hours claimed for one person in one day.",
           "同一人同一天申报超过24学时。"),
        _w("INTEGRITY_OVERLAP", "Overlapping offline trainings for one person.", "同一人线下培训时间重叠。"),
        _w("INTEGRITY_COMPLETED_IN_FUTURE", "The completion date lies after the day the record was reported.",
           "完成日期晚于报送日期。"),
        _w("INTEGRITY_ABOVE_PLAN", "Hours far above the filed plan's.", "学时远超备案计划学时。"),
        _w("INTEGRITY_OUTSIDE_PLAN", "The training dates lie outside the filed plan's period.",
           "培训日期超出备案计划的培训时限。"),
    )
}

ErrorCode = StrEnum("ErrorCode", {c: c for c in CATALOGUE})  # type: ignore[misc]


def message(code: str) -> tuple[str, str]:
    """The (English, Chinese) message of a code; unknown codes are a programming error."""
    info = CATALOGUE[code]
    return info.message_en, info.message_zh
