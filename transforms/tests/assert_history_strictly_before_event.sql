-- Leakage rule: a behaviour history never holds the event itself, a same-ts event or a later
-- event, and never exceeds var history_len. Returns the offending events (none = pass).

with

events as (

    select * from {{ ref('int_user_history') }}

),

failures as (

    select
        event_id,
        ts,
        history_len,
        history_max_ts,
        case
            when history_max_ts >= ts then 'history holds an event at or after ts'
            when history_len > {{ var('history_len') | int }} then 'history longer than var history_len'
            when history_len <> {{ recsys.list_length('history_item_idx') }} then 'history_len differs from the list length'
            when (history_len = 0) <> (history_max_ts is null) then 'history_max_ts inconsistent with an empty history'
        end as failure
    from events

)

select * from failures
where failure is not null
