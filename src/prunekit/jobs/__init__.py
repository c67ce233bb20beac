"""Every end-to-end job: load -> prune -> measure -> write files and reports.

Jobs compose the library (everything else under ``prunekit``) and are called by the command line
(``prunekit.cli``); the library never imports them.
"""
