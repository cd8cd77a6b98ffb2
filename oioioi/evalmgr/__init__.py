"""Evaluation manager: runs environ recipes and parks them while external systems work.

A reproduction of upstream OIOIOI's ``oioioi.evalmgr`` with the same app label, tables and function
names, so that a ``SavedEnviron`` written by a real OIOIOI resumes here exactly as it would there.
"""
