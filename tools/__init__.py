"""The tools people run: the `privrec` CLI, the simulation launcher, deployment, reports, recommend, audit.

They drive the apps (`client/`, `server/`) and the core (`shared/`); nothing in those imports them.
"""
