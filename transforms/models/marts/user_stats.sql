-- one row per train user: rating statistics over train rows only

with

train_events as (

    select user_id, rating, ts
    from {{ ref('int_split') }}
    where split = 'train'

),

user_vocab as (

    select user_id, user_idx from {{ ref('int_user_vocab') }}

),

aggregated as (

    select
        user_id,
        count(*) as n_ratings,
        avg(rating) as mean_rating,
        avg({{ recsys.indicator("rating >= " ~ var('like_threshold')) }}) as like_rate,
        min(ts) as first_ts,
        max(ts) as last_ts
    from train_events
    group by user_id

),

final as (

    select
        user_vocab.user_idx,
        aggregated.user_id,
        {{ dbt.cast('aggregated.n_ratings', dbt.type_int()) }} as n_ratings,
        {{ dbt.cast('aggregated.mean_rating', recsys.type_double()) }} as mean_rating,
        {{ dbt.cast('aggregated.like_rate', recsys.type_double()) }} as like_rate,
        aggregated.first_ts,
        aggregated.last_ts
    from aggregated
    inner join user_vocab on user_vocab.user_id = aggregated.user_id

)

select * from final
