-- The DuckDB history (one window pass, shifted ROWS frame) equals a straightforward recompute
-- on a deterministic sample of users (md5 of user_id below '04': 1 in 64): for each event, join the user's events
-- with a strictly smaller ts, keep the var history_len most recent by (ts, event_id), drop
-- unknown items, list oldest first. The recompute is the standard-SQL implementation
-- (default__user_history; on Spark, which has no ordered array_agg, a self-join that sorts
-- the collected events: user_history_reference), so this also checks the portable fallback.

with

sampled_events as (

    select event_id, user_id, ts, item_idx
    from {{ ref('int_user_history') }}
    where {{ dbt.hash(dbt.cast('user_id', dbt.type_string())) }} < '04'

),

recomputed as (

    {{ recsys.user_history_reference('sampled_events', var('history_len') | int) }}

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
