#!/bin/sh
# Entry point of the esports_chat image.
#   daphne ARGS...        run one web process (exec: it receives SIGTERM and drains)
#   manage.py COMMAND...  run a management command (migrate, createsuperuser, seed_chat, ...)
#   anything else         run it as given (a shell for debugging, for example)
set -e

case "$1" in
    daphne)
        # Daphne on uvloop (esports_chat/daphne_uvloop.py), same arguments as daphne.
        shift
        exec python -m esports_chat.daphne_uvloop "$@"
        ;;
    manage.py | manage)
        shift
        exec python /app/manage.py "$@"
        ;;
    *)
        exec "$@"
        ;;
esac
