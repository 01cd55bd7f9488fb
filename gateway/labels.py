"""Chinese words for the statuses the gateway stores, shared by the console and ops messages.

A neutral room: the console (gateway.console.render) prints these beside its pages' statuses,
and ops refusals (gateway.ops) name a record's status in their ``detail_zh`` with the same word,
so a clerk meets one vocabulary (SPEC §2: a zh-CN console).  Imports nothing.
"""

from __future__ import annotations

__all__ = ["STATUS_ZH", "status_zh"]

STATUS_ZH = {
    "pending": "待投递", "delivered": "已投递", "dead": "死信（投递失败）",
    "accepted": "已接收", "duplicate": "重复", "conflict": "冲突（待处理）", "stored": "已存储",
    "corrected": "已更正", "rejected": "已拒收", "superseded": "已被取代", "withdrawn": "已撤回",
    "revalidated": "已重新校验",
    "queued": "排队中", "processing": "处理中", "done": "已完成", "failed": "失败",
    "open": "未处理", "resolved": "已解决", "closed": "已关闭",
}


def status_zh(status: object) -> str:
    """The Chinese word for ``status``; an unknown one as it is."""
    return STATUS_ZH.get(str(status), str(status))
