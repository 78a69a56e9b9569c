-- one row per accepted interaction, with its split and train-vocabulary indices

with

split_events as (

    select * from {{ ref('int_split') }}

),

user_vocab as (

    select user_id, user_idx from {{ ref('int_user_vocab') }}

),

item_vocab as (

    select item_id, item_idx from {{ ref('int_item_vocab') }}

),

final as (

    select
        split_events.event_id,
        split_events.user_id,
        split_events.item_id,
        coalesce(user_vocab.user_idx, 0) as user_idx,
        coalesce(item_vocab.item_idx, 0) as item_idx,
        split_events.rating,
        split_events.ts,
        split_events.split
    from split_events
    left join user_vocab on user_vocab.user_id = split_events.user_id
    left join item_vocab on item_vocab.item_id = split_events.item_id

)

select * from final
