"""Human-readable reports of a run."""

from prunekit.report.markdown import write_report

__all__ = ["write_report"]
