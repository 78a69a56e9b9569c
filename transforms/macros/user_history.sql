{#
  user_history(relation, history_len)

  `relation` (a CTE or relation name) has one row per event with at least the columns
  event_id, user_id, ts and item_idx (0 = item outside the train vocabulary). Returns every
  column of `relation` plus
    history_item_idx  list of item_idx of the user's last `history_len` events with a ts
                      strictly smaller than this event's ts (ties on ts never enter),
                      oldest first by (ts, event_id), items with item_idx = 0 then left out;
                      NULL when nothing is left
    history_max_ts    max ts over the items kept in history_item_idx (NULL when empty);
                      lets a test prove history_max_ts < ts.
  Both implementations return the same rows; the default one is quadratic per user.
#}
{% macro user_history(relation, history_len) -%}
  {{ return(adapter.dispatch('user_history', 'recsys')(relation, history_len)) }}
{%- endmacro %}


{#
  DuckDB: one window pass with a ROWS frame of at most `history_len` rows. DuckDB accepts
  per-row frame offsets, so the frame is shifted past the rows of the same user with the same
  ts that sort before the current row (n_same_ts_before): the frame then ends at the row just
  before the first event of the current ts and holds exactly the `history_len` events before
  it. An unbounded/RANGE frame is never built.
#}
{% macro duckdb__user_history(relation, history_len) -%}
    select
        positioned.* exclude (n_same_ts_before),
        list(item_idx) filter (where item_idx > 0) over recent_earlier_events as history_item_idx,
        max(ts) filter (where item_idx > 0) over recent_earlier_events as history_max_ts
    from (
        select
            *,
            row_number() over (partition by user_id order by ts, event_id)
                - rank() over (partition by user_id order by ts) as n_same_ts_before
        from {{ relation }}
    ) as positioned
    window recent_earlier_events as (
        partition by user_id
        order by ts, event_id
        rows between n_same_ts_before + {{ history_len }} preceding
            and n_same_ts_before + 1 preceding
    )
{%- endmacro %}


{#
  Standard SQL (Postgres, Trino, ...): frame offsets must be constants there, so the history
  is a self-join on strictly earlier events ranked by recency, then an ordered array_agg.
  `earlier_relation` (default: `relation`) is where the earlier events come from.
#}
{% macro default__user_history(relation, history_len, earlier_relation=none) -%}
    select
        events.*,
        history.history_item_idx,
        history.history_max_ts
    from {{ relation }} as events
    left join (
        select
            event_id,
            array_agg(earlier_item_idx order by earlier_ts, earlier_event_id)
                filter (where earlier_item_idx > 0) as history_item_idx,
            max(case when earlier_item_idx > 0 then earlier_ts end) as history_max_ts
        from (
            select
                current_event.event_id,
                earlier_event.item_idx as earlier_item_idx,
                earlier_event.ts as earlier_ts,
                earlier_event.event_id as earlier_event_id,
                row_number() over (
                    partition by current_event.event_id
                    order by earlier_event.ts desc, earlier_event.event_id desc
                ) as recency
            from {{ relation }} as current_event
            inner join {{ earlier_relation or relation }} as earlier_event
                on earlier_event.user_id = current_event.user_id
                and earlier_event.ts < current_event.ts
        ) as candidates
        where recency <= {{ history_len }}
        group by event_id
    ) as history
        on history.event_id = events.event_id
{%- endmacro %}


{#
  Spark: window frame offsets must be constants, and collect_list keeps no order of its own.
  Every event of a (user, ts) group has the same history, the one of the group's first event
  by event_id: the `history_len` rows before that event all have a smaller ts. So a constant
  ROWS frame of `history_len` rows collects (ts, event_id, item_idx) structs, the group's
  first event passes its list to the others, and array_sort (by ts, then event_id) fixes the
  order before unknown items are dropped. Work and memory are O(events x history_len).
#}
{% macro spark__user_history(relation, history_len) -%}
    select
        events.*,
        history.history_item_idx,
        history.history_max_ts
    from {{ relation }} as events
    inner join (
        select
            event_id,
            case
                when size(kept_events) > 0 then transform(kept_events, e -> e.item_idx)
            end as history_item_idx,
            array_max(transform(kept_events, e -> e.ts)) as history_max_ts
        from (
            select
                event_id,
                filter(
                    array_sort(first(recent_events) over (
                        partition by user_id, ts
                        order by event_id
                        rows between unbounded preceding and current row
                    )),
                    e -> e.item_idx > 0
                ) as kept_events
            from (
                select
                    event_id,
                    user_id,
                    ts,
                    collect_list(struct(ts, event_id, item_idx)) over (
                        partition by user_id
                        order by ts, event_id
                        rows between {{ history_len }} preceding and 1 preceding
                    ) as recent_events
                from {{ relation }}
            ) as framed
        ) as shared
    ) as history
        on history.event_id = events.event_id
{%- endmacro %}


{#
  user_history_reference(relation, history_len, earlier_relation=none): the straightforward
  recompute the test assert_history_matches_recompute compares the built history with. DuckDB
  and standard SQL use default__user_history; Spark has no ordered array_agg, so it sorts
  collected structs. With `earlier_relation`, the histories of the events in `relation` are
  taken from the events of `earlier_relation` (a superset holding every event of their users),
  so a test can check some events of a user against all of that user's events.
#}
{% macro user_history_reference(relation, history_len, earlier_relation=none) -%}
  {{ return(adapter.dispatch('user_history_reference', 'recsys')(relation, history_len, earlier_relation)) }}
{%- endmacro %}

{% macro default__user_history_reference(relation, history_len, earlier_relation=none) -%}
  {{ recsys.default__user_history(relation, history_len, earlier_relation) }}
{%- endmacro %}

{% macro spark__user_history_reference(relation, history_len, earlier_relation=none) -%}
    select
        events.*,
        history.history_item_idx,
        history.history_max_ts
    from {{ relation }} as events
    left join (
        select
            event_id,
            case
                when size(collect_list(case when earlier_item_idx > 0 then earlier_item_idx end)) > 0
                    then transform(
                        array_sort(collect_list(case when earlier_item_idx > 0
                            then struct(earlier_ts, earlier_event_id, earlier_item_idx) end)),
                        e -> e.earlier_item_idx)
            end as history_item_idx,
            max(case when earlier_item_idx > 0 then earlier_ts end) as history_max_ts
        from (
            select
                current_event.event_id,
                earlier_event.item_idx as earlier_item_idx,
                earlier_event.ts as earlier_ts,
                earlier_event.event_id as earlier_event_id,
                row_number() over (
                    partition by current_event.event_id
                    order by earlier_event.ts desc, earlier_event.event_id desc
                ) as recency
            from {{ relation }} as current_event
            inner join {{ earlier_relation or relation }} as earlier_event
                on earlier_event.user_id = current_event.user_id
                and earlier_event.ts < current_event.ts
        ) as candidates
        where recency <= {{ history_len }}
        group by event_id
    ) as history
        on history.event_id = events.event_id
{%- endmacro %}
