-- one row per train item: rating statistics and popularity rank over train rows only

with

train_events as (

    select item_id, rating
    from {{ ref('int_split') }}
    where split = 'train'

),

item_vocab as (

    select item_id, item_idx from {{ ref('int_item_vocab') }}

),

aggregated as (

    select
        item_id,
        count(*) as n_ratings,
        avg(rating) as mean_rating,
        avg({{ recsys.indicator("rating >= " ~ var('like_threshold')) }}) as like_rate
    from train_events
    group by item_id

),

final as (

    select
        item_vocab.item_idx,
        aggregated.item_id,
        {{ dbt.cast('aggregated.n_ratings', dbt.type_int()) }} as n_ratings,
        {{ dbt.cast('aggregated.mean_rating', recsys.type_double()) }} as mean_rating,
        {{ dbt.cast('aggregated.like_rate', recsys.type_double()) }} as like_rate,
        -- strict rank: ties in n_ratings broken by item_idx, so ranks are 1..n without gaps
        {{ dbt.cast('row_number() over (order by aggregated.n_ratings desc, item_vocab.item_idx)', dbt.type_int()) }} as popularity_rank
    from aggregated
    inner join item_vocab on item_vocab.item_id = aggregated.item_id

)

select * from final
