-- one row per item with at least one train event

with

item_vocab as (

    select * from {{ ref('int_item_vocab') }}

),

item_features as (

    select * from {{ ref('int_item_features') }}

),

final as (

    select
        item_vocab.item_idx,
        item_vocab.item_id,
        item_features.title,
        item_features.year,
        item_features.genres,
        coalesce(item_features.genre_idx, 0) as genre_idx,
        coalesce(item_features.year_idx, 0) as year_idx,
        item_vocab.n_train_events
    from item_vocab
    left join item_features on item_features.item_id = item_vocab.item_id

)

select * from final
