{{ recsys.validate_vars() }}

-- every event with the user's behaviour history (rules: int_user_history.yml, macro user_history)

with

split_events as (

    select event_id, user_id, item_id, rating, ts, split
    from {{ ref('int_split') }}

),

item_vocab as (

    select item_id, item_idx
    from {{ ref('int_item_vocab') }}

),

events as (

    select
        split_events.*,
        coalesce(item_vocab.item_idx, 0) as item_idx
    from split_events
    left join item_vocab on item_vocab.item_id = split_events.item_id

),

with_history as (

    {{ recsys.user_history('events', var('history_len') | int) }}

),

final as (

    select
        event_id,
        user_id,
        item_id,
        item_idx,
        rating,
        ts,
        split,
        coalesce(history_item_idx, {{ recsys.empty_int_list() }}) as history_item_idx,
        coalesce({{ recsys.list_length('history_item_idx') }}, 0) as history_len,
        history_max_ts
    from with_history

)

select * from final
