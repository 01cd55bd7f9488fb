"""Rendering for the console: one Jinja2 environment, Chinese labels, local times, masking.

Every value a template prints passes through :func:`_finalize`, which masks anything that looks
like an identity number (gateway.masking): a page can never show one unmasked, whatever a
payload, an error text or an audit detail holds.  Masking keeps the gateway's record, batch and
delivery ids whole by their shape; the one exception beyond those is :class:`Ident`: a value the
gateway generated itself (a CSRF token, a link's query, a notice built from ids) may hold a run
of 15 or 18 digits by chance, and masking it would break the link or the form it is in, so the
console's code wraps such values and they print as they are.  Times are shown in
``Settings.timezone`` (Asia/Shanghai).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode
from zoneinfo import ZoneInfo

from fastapi.responses import HTMLResponse
from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from markupsafe import Markup

from gateway.labels import status_zh
from gateway.masking import mask_text

TEMPLATES = Path(__file__).resolve().parent.parent / "api" / "templates" / "console"

CIRCUIT_ZH = {"closed": "闭合（正常投递）", "open": "断开（暂停投递）", "half_open": "半开（试探投递）"}
ADAPTER_ZH = {"canonical": "标准接口", "training_base": "培训基地", "health": "卫健委",
              "finance": "财政厅", "cadre_college": "干部网络学院"}
# Audit kinds no code writes any more, labelled for the events older releases left in a store:
# "requeued" was a delivery with no receipt in its reply, put back at once (a failed attempt
# with a "retry_scheduled" event since session 30).
RETIRED_EVENT_KINDS = frozenset({"requeued"})
EVENT_ZH = {"received": "接收", "queued": "进入投递队列", "attempt": "投递尝试",
            "retry_scheduled": "安排重试", "delivered": "已投递", "dead": "转入死信",
            "split": "拆分批次", "requeued": "重新排队", "delivery_requeued": "运维重新投递",
            "delivery_superseded": "死信被新版本取代", "ops_reprocess": "运维批量重新投递",
            "edited": "修改后重新投递", "rejection_edited": "修改拒收记录后重新处理",
            "rejection_withdrawn": "合作方撤回，关闭其拒收记录",
            "superseded": "被冲突记录取代", "conflict": "判定冲突", "conflict_resolved": "冲突已解决",
            "duplicate": "判定重复", "corrected": "更正（新版本）", "recredited": "重新核定学时",
            "revalidation": "重新校验", "rejected": "拒收", "withdrawn": "撤回",
            "succeeded": "接替原记录计入学时（原记录已撤回或已更正）",
            "retention_pruned": "按保留期清理", "cap_reallocated": "封顶学时重新分配",
            "store_repaired": "升级时修复存储数据", "store_restored": "从备份恢复存储后重新编号版本",
            "pull_cursor_reset": "拉取游标重置",
            "batch_received": "接收批量文件", "batch_resent": "重复上传同一文件（按原批次答复）",
            "batch_done": "批量文件处理完成", "batch_failed": "批量文件处理失败",
            "partner_added": "新增合作方", "partner_secret_rotated": "更换合作方密钥",
            "partner_disabled": "停用合作方", "partner_enabled": "重新启用合作方",
            "operator_added": "新增运维人员", "operator_revoked": "吊销运维人员令牌",
            "operator_reissued": "重新签发运维人员令牌", "reference_imported": "导入参考数据",
            "reference_synced": "同步参考数据"}


class Ident(str):
    """An identifier the gateway generated itself: printed as is, never masked.

    Wrap only values the gateway made that masking does not already keep whole (CSRF tokens,
    a link's query, a notice built from ids and constant text), never text a partner or an
    operator typed: that is masked as usual.  Record, batch and delivery ids need no wrapping.
    """

    __slots__ = ()


def _finalize(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, Ident):
        return str(value)
    if isinstance(value, Markup):
        # A macro's output: every value in it went through here already.  Masked again, an
        # Ident inside it (a CSRF token with an id-number-like run) would be masked after all,
        # and the masked text, no longer Markup, escaped: the whole form printed as text.
        return value
    return mask_text(value) if isinstance(value, str) else value


def _as_datetime(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, str) and value:
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            return None
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    return None


def _json(value: Any) -> str:
    """Readable JSON for audit details (Chinese as is; autoescaping still applies)."""
    return json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)


def age_zh(seconds: Any) -> str:
    """``3725`` → ``1 小时 2 分``; None → ``—``."""
    if seconds is None:
        return "—"
    total = int(float(seconds))
    days, rest = divmod(max(total, 0), 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days} 天 {hours} 小时"
    if hours:
        return f"{hours} 小时 {minutes} 分"
    if minutes:
        return f"{minutes} 分 {secs} 秒"
    return f"{secs} 秒"


class Renderer:
    """The console's Jinja2 environment, bound to one time zone."""

    def __init__(self, timezone: str) -> None:
        self.zone = ZoneInfo(timezone)
        self.env = Environment(loader=FileSystemLoader(str(TEMPLATES)),
                               autoescape=select_autoescape(default=True, default_for_string=True),
                               undefined=StrictUndefined, finalize=_finalize,
                               trim_blocks=True, lstrip_blocks=True)
        self.env.filters.update(local=self.local, age=age_zh, status=status_zh,
                                circuit=lambda s: CIRCUIT_ZH.get(s, s),
                                adapter=lambda s: ADAPTER_ZH.get(s, s) if s else "",
                                event=lambda s: EVENT_ZH.get(s, s), query=self.query,
                                json=_json)

    def local(self, value: Any, fmt: str = "%Y-%m-%d %H:%M:%S") -> str:
        when = _as_datetime(value)
        return when.astimezone(self.zone).strftime(fmt) if when else "—"

    @staticmethod
    def query(params: dict[str, Any], **changes: Any) -> Ident:
        """A query string from ``params`` with ``changes``; empty values are left out.

        Each value is masked on its own unless it is an :class:`Ident`: a record or batch id
        passes whole (masking keeps the gateway's ids), a typed identity number stays masked.
        """
        pairs: list[tuple[str, str]] = []
        for key, value in {**params, **changes}.items():
            for item in value if isinstance(value, list | tuple) else [value]:
                if item not in (None, ""):
                    pairs.append((key, item if isinstance(item, Ident) else mask_text(str(item))))
        return Ident(urlencode(pairs))

    def page(self, name: str, status_code: int = 200, **context: Any) -> HTMLResponse:
        html = self.env.get_template(name).render(**context)
        return HTMLResponse(html, status_code=status_code, headers=SECURITY_HEADERS)


SECURITY_HEADERS = {
    # Nothing inline, nothing from elsewhere: the console's own CSS and forms only.
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; img-src 'self'; "
                               "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
