"""The rollout page, `/ops/` on the API: what `status`, `phase` and `dead-letters list` print,
on one self-refreshing screen, with replay and pause/resume of the bulk passes.

`routes` (HTTP, templates), `service` (what the page shows and does, through the services and
repositories), `auth` (basic auth from `OPS_BASIC_AUTH`, CSRF tokens), `templates/` (Jinja2).
"""
