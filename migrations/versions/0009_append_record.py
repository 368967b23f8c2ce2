"""Each version of a chat says whether it only appended: the sync copies just those elements.

Most versions of a chat add elements at the end of the array. The version triggers now record,
for every writer, which versions did nothing else, and the sync records what its copy covered,
so that a sync can tell in O(1) that its chat only grew since its last copy and map only the new
positions (`app.repositories.messages`). New columns of `copilot_chat_sync_state`:

- `append_since`: every version of the chat above this one appended elements to the one before
  and did nothing else (written by the version trigger; NULL: unknown, the next copy is whole).
- `elements_version`, `applied_elements`: the version whose copy was complete (every element
  valid, every row it meant to write written) and the array's length at that version (written
  by the convergence). A sync whose applied version is that version copies the positions from
  `applied_elements` on; any other writer of `applied_version` leaves them unequal.

How a version is judged, in the `BEFORE` trigger, which sees `OLD` and `NEW`:

- This service's append claims itself: `copilot_chats_append(...)` computes `messages ||
  elements` and records, transaction-locally, the chat, the version it read and both lengths.
  The trigger honours the claim only for that chat at that version and a new array of the
  claimed length, and clears it: O(1), the old array is never read again.
- Any other write (a replace, a script, the previous release) is judged by comparing the old
  array with the new one's prefix, when the old one is small enough for that to be cheap;
  anything larger, or any doubt, counts as "anything else", which only costs a whole copy.

The `AFTER` trigger reads that verdict (keyed by chat and version, so a verdict never applies to
another row) and moves `append_since` in the same upsert that records the wanted version.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-21
"""

from __future__ import annotations

from migrations import online

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

# Stored size (compressed, read from the TOAST pointer without fetching the value) up to which a
# write that does not claim an append has its old array compared with the new one's prefix.
# Beyond it the comparison (a detoast of both arrays and a walk over them) would cost the writer
# more than the whole copy it could spare the sync.
COMPARE_MAX_BYTES = 262_144

# `messages || elements`, recording that it is one (read by the version trigger of the same row,
# which clears it). Only for the new value of `messages` in an UPDATE of `copilot_chats`, with
# `version` and `messages` the row's own `messages_version` and `messages` as the SET sees them:
# re-evaluated on the newest row if the row changed under the statement, so the claim always
# describes the row the trigger sees as OLD.
APPEND = """
CREATE OR REPLACE FUNCTION copilot_chats_append(chat uuid, version bigint, messages jsonb,
                                                elements jsonb) RETURNS jsonb
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    old_length int;
BEGIN
    IF jsonb_typeof(messages) IS DISTINCT FROM 'array' THEN
        RETURN '[]'::jsonb || elements;  -- replaces a broken value: not an append
    END IF;
    IF jsonb_typeof(elements) IS DISTINCT FROM 'array' THEN
        RETURN messages || elements;
    END IF;
    old_length := jsonb_array_length(messages);
    PERFORM set_config(
        'dualwrite.append_claim',
        format('%s/%s/%s/%s', chat, version, old_length,
               old_length + jsonb_array_length(elements)),
        true);
    RETURN messages || elements;
END
$$
"""

# The statement trigger of revision 0007, which fires before a statement that writes `messages`
# computes any new value, also clears what an earlier statement of the transaction may have
# left: a claim whose row was not written after all (the row changed under the statement and no
# longer matched it), a verdict. A claim or verdict is thus only ever read by row triggers of
# the statement that made it.
HOLD_PHASE_TRIGGER_FUNCTION = """
CREATE OR REPLACE FUNCTION copilot_chats_hold_phase() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM set_config('dualwrite.append_claim', '', true),
            set_config('dualwrite.appended', '', true);
    IF current_setting('dualwrite.reverse_sync', true) IS DISTINCT FROM 'on' THEN
        PERFORM dualwrite_hold_phase();
    END IF;
    RETURN NULL;
END
$$
"""

HOLD_PHASE_TRIGGER_FUNCTION_0007 = """
CREATE OR REPLACE FUNCTION copilot_chats_hold_phase() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('dualwrite.reverse_sync', true) IS DISTINCT FROM 'on' THEN
        PERFORM dualwrite_hold_phase();
    END IF;
    RETURN NULL;
END
$$
"""

BUMP_VERSION = f"""
CREATE OR REPLACE FUNCTION copilot_chats_bump_version() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    claim text;
    old_messages jsonb;
    old_length int;
    appended boolean := false;
BEGIN
    IF current_setting('dualwrite.reverse_sync', true) = 'on' THEN
        RETURN NEW;  -- the reverse sync sets the version it copied
    END IF;
    IF (TG_OP = 'UPDATE' OR NEW.messages IS DISTINCT FROM '[]'::jsonb)
       AND dualwrite_hold_phase() = 'table_only' THEN
        RAISE EXCEPTION 'copilot_chats.messages is read-only in phase table_only'
            USING ERRCODE = 'read_only_sql_transaction',
                  HINT = 'The rows of copilot_chat_messages are the transcript: write through '
                         'the service, or step the phase back to read_table first.';
    END IF;
    IF TG_OP <> 'UPDATE' THEN
        IF NEW.messages IS DISTINCT FROM '[]'::jsonb THEN
            NEW.messages_version := greatest(NEW.messages_version, 1);
        END IF;
        RETURN NEW;
    END IF;
    NEW.messages_version := OLD.messages_version + 1;
    -- Did this version only append to the one before? NEW is the value the statement built (in
    -- memory, not yet stored), so its length is cheap; OLD's array is read only without a claim.
    claim := current_setting('dualwrite.append_claim', true);
    IF claim IS NOT NULL AND claim <> '' THEN
        PERFORM set_config('dualwrite.append_claim', '', true);
        appended := jsonb_typeof(NEW.messages) = 'array'
            AND claim = format('%s/%s/%s/%s', OLD.id, OLD.messages_version,
                               split_part(claim, '/', 3),
                               jsonb_array_length(NEW.messages));
    ELSIF pg_column_size(OLD.messages) <= {COMPARE_MAX_BYTES}
          AND pg_column_size(NEW.messages) <= {COMPARE_MAX_BYTES} * 4 THEN
        old_messages := OLD.messages;
        IF jsonb_typeof(old_messages) = 'array' AND jsonb_typeof(NEW.messages) = 'array' THEN
            old_length := jsonb_array_length(old_messages);
            appended := jsonb_array_length(NEW.messages) >= old_length
                AND (old_length = 0
                     OR jsonb_path_query_array(NEW.messages, '$[0 to $last]',
                                               jsonb_build_object('last', old_length - 1))
                        = old_messages);
        END IF;
    END IF;
    PERFORM set_config(
        'dualwrite.appended',
        CASE WHEN appended THEN format('%s/%s', NEW.id, NEW.messages_version) ELSE '' END,
        true);
    RETURN NEW;
END
$$
"""

# `append_since` moves up to a version that did anything but append; a version that appended
# leaves it, or starts it at the version before (which this one only appended to) when unknown.
MARK_WANTED = """
CREATE OR REPLACE FUNCTION copilot_chats_mark_wanted() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    appended boolean;
BEGIN
    IF current_setting('dualwrite.reverse_sync', true) = 'on' THEN
        RETURN NULL;
    END IF;
    appended := TG_OP = 'UPDATE'
        AND current_setting('dualwrite.appended', true)
            = format('%s/%s', NEW.id, NEW.messages_version);
    INSERT INTO copilot_chat_sync_state AS s
        (chat_id, wanted_version, applied_version, dirty_since, append_since)
    VALUES (NEW.id, NEW.messages_version,
            CASE WHEN NEW.messages_version = 0 THEN 0 ELSE -1 END, now(),
            CASE WHEN appended THEN NEW.messages_version - 1 ELSE NEW.messages_version END)
    ON CONFLICT (chat_id) DO UPDATE SET
        wanted_version = greatest(s.wanted_version, EXCLUDED.wanted_version),
        dirty_since = CASE WHEN s.applied_version >= s.wanted_version
                           THEN now() ELSE s.dirty_since END,
        append_since = CASE WHEN appended THEN coalesce(s.append_since, EXCLUDED.append_since)
                            ELSE greatest(s.append_since, NEW.messages_version) END;
    RETURN NULL;
END
$$
"""

# As revision 0007 left them, for the downgrade.
BUMP_VERSION_0007 = """
CREATE OR REPLACE FUNCTION copilot_chats_bump_version() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('dualwrite.reverse_sync', true) = 'on' THEN
        RETURN NEW;  -- the reverse sync sets the version it copied
    END IF;
    IF (TG_OP = 'UPDATE' OR NEW.messages IS DISTINCT FROM '[]'::jsonb)
       AND dualwrite_hold_phase() = 'table_only' THEN
        RAISE EXCEPTION 'copilot_chats.messages is read-only in phase table_only'
            USING ERRCODE = 'read_only_sql_transaction',
                  HINT = 'The rows of copilot_chat_messages are the transcript: write through '
                         'the service, or step the phase back to read_table first.';
    END IF;
    IF TG_OP = 'UPDATE' THEN
        NEW.messages_version := OLD.messages_version + 1;
    ELSIF NEW.messages IS DISTINCT FROM '[]'::jsonb THEN
        NEW.messages_version := greatest(NEW.messages_version, 1);
    END IF;
    RETURN NEW;
END
$$
"""

MARK_WANTED_0005 = """
CREATE OR REPLACE FUNCTION copilot_chats_mark_wanted() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('dualwrite.reverse_sync', true) = 'on' THEN
        RETURN NULL;
    END IF;
    INSERT INTO copilot_chat_sync_state AS s
        (chat_id, wanted_version, applied_version, dirty_since)
    VALUES (NEW.id, NEW.messages_version,
            CASE WHEN NEW.messages_version = 0 THEN 0 ELSE -1 END, now())
    ON CONFLICT (chat_id) DO UPDATE SET
        wanted_version = greatest(s.wanted_version, EXCLUDED.wanted_version),
        dirty_since = CASE WHEN s.applied_version >= s.wanted_version
                           THEN now() ELSE s.dirty_since END;
    RETURN NULL;
END
$$
"""


def upgrade() -> None:
    # Every write to a chat writes its sync state and fires these triggers: each step runs
    # under `lock_timeout`, retried, and is idempotent. Nullable columns without a default: a
    # catalog-only change; NULL reads as "unknown", so every chat's next copy is whole.
    with online.revision_steps() as step:
        step(
            "add the append record to copilot_chat_sync_state",
            "ALTER TABLE copilot_chat_sync_state ADD COLUMN IF NOT EXISTS append_since bigint, "
            "ADD COLUMN IF NOT EXISTS elements_version bigint, "
            "ADD COLUMN IF NOT EXISTS applied_elements int",
        )
        # The trigger functions are replaced in one transaction: the wanted mark never reads a
        # verdict that the version trigger does not write.
        step(
            "the version triggers record appends",
            APPEND,
            HOLD_PHASE_TRIGGER_FUNCTION,
            BUMP_VERSION,
            MARK_WANTED,
        )


def downgrade() -> None:
    with online.revision_steps() as step:
        step(
            "the version triggers no longer record appends",
            HOLD_PHASE_TRIGGER_FUNCTION_0007,
            BUMP_VERSION_0007,
            MARK_WANTED_0005,
            "DROP FUNCTION IF EXISTS copilot_chats_append(uuid, bigint, jsonb, jsonb)",
        )
        step(
            "drop the append record",
            "ALTER TABLE copilot_chat_sync_state DROP COLUMN IF EXISTS append_since, "
            "DROP COLUMN IF EXISTS elements_version, DROP COLUMN IF EXISTS applied_elements",
        )
