"""A study's claims (``reference.claims``): their form, parsed and checked without the report.

config.validate refuses a malformed claim at launch, before any weights load; the report
(analysis/report_claims.py) evaluates the parsed claims against the measured arms. The forms
and verdicts are described there.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

_COMPARE = re.compile(r"^\s*(.+?)\s+(<|>|~|≈)\s+(.+?)\s*$")
_SPLIT = re.compile(r",\s*(?=[\w.]+(?:/[\w.]+)?\s*=)")  # "targets=q_proj,v_proj, seed=1": split before "seed="
_FIELDS = {"metric", "compare", "best", "per", "margin", "max_std", "article", "higher_is_better", "note",
           "by_construction", "best_lr", "ratio", "tolerance"}


class ReportError(ValueError):
    """A study's claims, or the records a report reads, cannot give a report: the message says why."""


@dataclass(frozen=True)
class Claim:
    metric: str
    kind: str                      # compare | best | spread
    a: dict = field(default_factory=dict)
    op: str = ""                   # <, >, ~ (compare)
    b: dict = field(default_factory=dict)
    per: tuple = ()
    margin: Any = 0
    article: str = ""
    higher_is_better: bool | None = None
    text: str = ""
    b_value: float | None = None   # compare: "A < 0": A against a number (e.g. a delta against the base)
    by_construction: bool = False  # holds by how the arms are built (parameter counts): not a finding
    note: str = ""                 # what in the design may decide the verdict, said on its line
    ratio: float | None = None     # best_lr: the expected ratio of A's best lr to B's
    tolerance: float = 3.0         # best_lr: within ratio / tolerance .. ratio x tolerance


def _selector(text: str, where: str) -> dict:
    out = {}
    for part in _SPLIT.split(str(text).strip()):
        if "=" not in part:
            raise ReportError(f"{where}={text!r}: each arm is param=value, e.g. 'precision=nf4' or "
                              "'optimizer=sgd, precision=nf4'")
        k, v = part.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def margin_value(m: Any) -> float | None:
    """The number in a margin (5 for '5%'), or None when it is neither a number >= 0 nor a percentage."""
    if isinstance(m, str) and m.strip().endswith("%"):
        try:
            v = float(m.strip()[:-1])
        except ValueError:
            return None
    elif isinstance(m, (int, float)) and not isinstance(m, bool):
        v = float(m)
    else:
        return None
    return v if v >= 0 else None


def parse_claims(reference: dict | None) -> list[Claim]:
    """The study's claims (reference.claims, a list; `claim` is read too). One error names the bad field."""
    ref = reference or {}
    raw = ref.get("claims", ref.get("claim"))
    if raw is None:
        return []
    if isinstance(raw, dict):
        raw = [raw]
    if not isinstance(raw, (list, tuple)):
        raise ReportError(f"reference.claims={raw!r}: must be a list of claims, e.g. "
                          "[{metric: memory, compare: 'precision=nf4 < precision=fp32'}]")
    out = []
    for i, c in enumerate(raw):
        where = f"reference.claims[{i}]"
        if not isinstance(c, dict) or not c.get("metric"):
            raise ReportError(f"{where}={c!r}: needs metric (a measured column such as val/loss, or memory)")
        unknown = set(c) - _FIELDS
        if unknown:
            raise ReportError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(_FIELDS))}")
        kinds = [k for k in ("compare", "best", "max_std", "best_lr") if c.get(k) is not None]
        if len(kinds) != 1:
            raise ReportError(f"{where}: give exactly one of compare ('A < B', 'A > B', 'A ~ B'), best (an arm), "
                              f"max_std (a spread) or best_lr ('A / B' with ratio), not {kinds or 'none'}")
        margin = c.get("margin", 0)
        if margin_value(margin) is None:
            raise ReportError(f"{where}.margin={margin!r}: must be a number >= 0 or a percentage like '5%'")
        per = c.get("per") or ()
        per = tuple([per] if isinstance(per, str) else per)
        if not isinstance(c.get("by_construction", False), bool):
            raise ReportError(f"{where}.by_construction={c['by_construction']!r}: must be true or false")
        common = dict(metric=str(c["metric"]), per=per, margin=margin, article=str(c.get("article") or ""),
                      higher_is_better=c.get("higher_is_better"), by_construction=bool(c.get("by_construction")),
                      note=str(c.get("note") or ""))
        if kinds == ["compare"]:
            m = _COMPARE.match(str(c["compare"]))
            if not m:
                raise ReportError(f"{where}.compare={c['compare']!r}: must read 'A < B', 'A > B' or 'A ~ B', "
                                  "e.g. 'precision=nf4 < precision=fp32'")
            op = "~" if m.group(2) == "≈" else m.group(2)
            if op == "~" and not margin_value(margin):
                raise ReportError(f"{where}.margin: 'A ~ B' needs a margin > 0 (the largest difference that "
                                  "still counts as equal), e.g. margin: 2%")
            text = f"{m.group(1)} {op} {m.group(3)}"
            b_value = _number(m.group(3))
            out.append(Claim(kind="compare", a=_selector(m.group(1), f"{where}.compare"), op=op,
                             b={} if b_value is not None else _selector(m.group(3), f"{where}.compare"),
                             b_value=b_value, text=text + _per_text(per), **common))
        elif kinds == ["best_lr"]:
            if not reference or not ref.get("select"):
                raise ReportError(f"{where}.best_lr: needs reference.select (the lr grid each arm's best is picked from)")
            parts = str(c["best_lr"]).split(" / ")
            ratio, tol = _number(str(c.get("ratio"))), _number(str(c.get("tolerance", 3)))
            if len(parts) != 2 or ratio is None or ratio <= 0 or tol is None or tol < 1:
                raise ReportError(f"{where}: best_lr reads 'A / B' (two arms) with ratio > 0 (A's best lr over B's) "
                                  f"and tolerance >= 1, e.g. {{best_lr: 'method=lora / method=full', ratio: 10}}")
            out.append(Claim(kind="best_lr", a=_selector(parts[0], f"{where}.best_lr"), op="/",
                             b=_selector(parts[1], f"{where}.best_lr"), ratio=ratio, tolerance=tol,
                             text=f"best lr {parts[0]} / {parts[1]} = {c['ratio']} (within {tol:g}x)" + _per_text(per),
                             **common))
        elif kinds == ["best"]:
            out.append(Claim(kind="best", a=_selector(c["best"], f"{where}.best"),
                             text=f"{c['best']} best" + _per_text(per), **common))
        else:
            if margin_value(c["max_std"]) is None:
                raise ReportError(f"{where}.max_std={c['max_std']!r}: must be a number >= 0 or a percentage like '2%'")
            out.append(Claim(kind="spread", margin=c["max_std"], text=f"std over seeds <= {c['max_std']}" + _per_text(per),
                             **{k: v for k, v in common.items() if k != "margin"}))
    return out


@dataclass(frozen=True)
class Selection:
    """reference.select: each arm's runs at the value of ``param`` (its learning rate) that scored best
    on ``on`` (a validation metric); the claims are then judged on other metrics (a held-out split)."""
    param: str
    on: str
    lower_is_better: bool


def parse_selection(reference: dict | None) -> Selection | None:
    """reference.select = {param: optimizer.lr_factor, by: val/loss}, or None when the study selects nothing."""
    sel = (reference or {}).get("select")
    if sel is None:
        return None
    if not isinstance(sel, dict) or not sel.get("param") or not sel.get("by") or set(sel) - {"param", "by", "higher_is_better"}:
        raise ReportError(f"reference.select={sel!r}: must be {{param: <swept key, e.g. optimizer.lr_factor>, by: "
                          "<validation metric, e.g. val/loss>} (optional higher_is_better)")
    on = str(sel["by"])
    hib = sel.get("higher_is_better")
    lower = (not hib) if hib is not None else any(s in on for s in ("loss", "perplexity"))
    return Selection(str(sel["param"]), on, lower)


def claim_problems(reference: dict | None) -> list[str]:
    """The claims' syntax problems as one-line messages (empty when they parse)."""
    try:
        parse_claims(reference)
        sel = parse_selection(reference)
    except ReportError as e:
        return [str(e)]
    if sel is not None:
        same = [c.metric for c in parse_claims(reference) if c.metric == sel.on and c.kind != "best_lr" and not c.by_construction]
        if same:
            return [f"reference.select.by={sel.on!r}: a claim is judged on the metric the learning rate was picked "
                    f"on ({same[0]}), which biases it; judge it on a held-out split (eval.test_loss: test/loss)"]
    return []


def _per_text(per: tuple) -> str:
    return f" (per {', '.join(per)})" if per else ""
