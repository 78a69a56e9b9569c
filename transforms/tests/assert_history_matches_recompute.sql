-- The DuckDB history (one window pass, shifted ROWS frame) equals a straightforward recompute
-- on a deterministic sample: the users with md5(user_id) below '04' (1 in 64), and of each
-- such user up to var history_check_events_per_user (256) events picked by md5(event_id).
-- For each picked event, join all of the user's events with a strictly smaller ts, keep the
-- var history_len most recent by (ts, event_id), drop unknown items, list oldest first. The
-- recompute is the standard-SQL implementation (default__user_history; on Spark, which has no
-- ordered array_agg, a self-join that sorts the collected events: user_history_reference), so
-- this also checks the portable fallback.
-- The cap keeps the check linear in events: the self-join costs picked events x the user's
-- events, so without it one heavy user costs the square of their events (at ML-25M shape the
-- sampled users' 374k events made 358M candidate pairs; with the cap, 72M).

{%- set per_user = var('history_check_events_per_user') | int %}
{%- if per_user < 1 %}
  {{ exceptions.raise_compiler_error("var history_check_events_per_user must be an integer >= 1, got " ~ var('history_check_events_per_user')) }}
{%- endif %}

with

sampled_users_events as (

    select event_id, user_id, ts, item_idx
    from {{ ref('int_user_history') }}
    where {{ dbt.hash(dbt.cast('user_id', dbt.type_string())) }} < '04'

),

picked_events as (

    select event_id, user_id, ts, item_idx
    from (
        select
            *,
            row_number() over (
                partition by user_id
                order by {{ dbt.hash(dbt.cast('event_id', dbt.type_string())) }}, event_id
            ) as pick
        from sampled_users_events
    ) as ranked
    where pick <= {{ per_user }}

),

recomputed as (

    {{ recsys.user_history_reference('picked_events', var('history_len') | int, 'sampled_users_events') }}

),

built as (

    select event_id, history_item_idx, history_max_ts
    from {{ ref('int_user_history') }}

),

compared as (

    select
        recomputed.event_id,
        coalesce(recomputed.history_item_idx, {{ recsys.empty_int_list() }}) as expected_history,
        built.history_item_idx as built_history,
        recomputed.history_max_ts as expected_max_ts,
        built.history_max_ts as built_max_ts
    from recomputed
    left join built on built.event_id = recomputed.event_id

)

select * from compared
where expected_history is distinct from built_history
   or expected_max_ts is distinct from built_max_ts
