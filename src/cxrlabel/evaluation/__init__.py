"""Evaluation: predictions, metrics, scoring, external predictions, tables, figures and reports."""

from cxrlabel.evaluation.report import write_report

__all__ = ["write_report"]
