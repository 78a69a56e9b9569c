{{ config(meta={"dagster": {"ref": {"name": "user_stats"}}}) }}

-- Stats rule: user_stats / item_stats are train-only. Recomputes them from the train rows of
-- fct_ratings and returns every user / item where a count, mean, like rate or timestamp
-- differs, or that is missing on either side (none = pass).

with

train_ratings as (

    select user_idx, item_idx, rating, ts
    from {{ ref('fct_ratings') }}
    where split = 'train'

),

user_stats as (

    select * from {{ ref('user_stats') }}

),

item_stats as (

    select * from {{ ref('item_stats') }}

),

user_recount as (

    select
        user_idx,
        count(*) as n_ratings,
        avg(rating) as mean_rating,
        avg({{ recsys.indicator("rating >= " ~ var('like_threshold')) }}) as like_rate,
        min(ts) as first_ts,
        max(ts) as last_ts
    from train_ratings
    group by user_idx

),

item_recount as (

    select
        item_idx,
        count(*) as n_ratings,
        avg(rating) as mean_rating,
        avg({{ recsys.indicator("rating >= " ~ var('like_threshold')) }}) as like_rate
    from train_ratings
    group by item_idx

),

user_failures as (

    select
        'user_stats' as failure_in,
        coalesce(user_stats.user_idx, user_recount.user_idx) as idx,
        user_stats.n_ratings as stats_n_ratings,
        user_recount.n_ratings as train_n_ratings
    from user_stats
    full outer join user_recount on user_recount.user_idx = user_stats.user_idx
    where user_stats.user_idx is null
       or user_recount.user_idx is null
       or user_stats.n_ratings <> user_recount.n_ratings
       or abs(user_stats.mean_rating - user_recount.mean_rating) > 1e-9
       or abs(user_stats.like_rate - user_recount.like_rate) > 1e-9
       or user_stats.first_ts <> user_recount.first_ts
       or user_stats.last_ts <> user_recount.last_ts

),

item_failures as (

    select
        'item_stats' as failure_in,
        coalesce(item_stats.item_idx, item_recount.item_idx) as idx,
        item_stats.n_ratings as stats_n_ratings,
        item_recount.n_ratings as train_n_ratings
    from item_stats
    full outer join item_recount on item_recount.item_idx = item_stats.item_idx
    where item_stats.item_idx is null
       or item_recount.item_idx is null
       or item_stats.n_ratings <> item_recount.n_ratings
       or abs(item_stats.mean_rating - item_recount.mean_rating) > 1e-9
       or abs(item_stats.like_rate - item_recount.like_rate) > 1e-9

),

rank_failures as (

    -- popularity_rank must order items by train count, most rated first
    select
        'item_stats.popularity_rank' as failure_in,
        item_idx as idx,
        n_ratings as stats_n_ratings,
        previous_n_ratings as train_n_ratings
    from (
        select
            item_idx,
            n_ratings,
            lag(n_ratings) over (order by popularity_rank) as previous_n_ratings
        from item_stats
    ) as ranked
    where previous_n_ratings < n_ratings

)

select * from user_failures
union all
select * from item_failures
union all
select * from rank_failures
