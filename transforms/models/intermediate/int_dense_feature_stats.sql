-- one row: train-only mean and standard deviation of each dense feature (z-score parameters)
-- Rounded to 9 decimals: a parallel float aggregate differs in its last bits from one build to
-- the next, which would change every standardised feature, the marts' content hash and the
-- snapshot's data version on unchanged data.

with

split_events as (

    select user_id, item_id, ts
    from {{ ref('int_split') }}
    where split = 'train'

),

user_vocab as (

    select user_id, n_train_events from {{ ref('int_user_vocab') }}

),

item_vocab as (

    select item_id, n_train_events from {{ ref('int_item_vocab') }}

),

items as (

    select item_id, year from {{ ref('stg_items') }}

),

train_rows as (

    select
        ln(1 + user_vocab.n_train_events) as user_activity,
        ln(1 + item_vocab.n_train_events) as item_popularity,
        {{ recsys.utc_year('split_events.ts') }} - items.year as item_age
    from split_events
    inner join user_vocab on user_vocab.user_id = split_events.user_id
    inner join item_vocab on item_vocab.item_id = split_events.item_id
    left join items on items.item_id = split_events.item_id

),

item_age_mean as (

    select round(avg({{ dbt.cast('item_age', recsys.type_double()) }}), 9) as item_age_mean
    from train_rows

),

-- unknown release year -> train mean, before the standard deviation is taken
imputed as (

    select
        train_rows.user_activity,
        train_rows.item_popularity,
        coalesce(train_rows.item_age, item_age_mean.item_age_mean) as item_age
    from train_rows
    cross join item_age_mean

),

aggregated as (

    select
        {{ dbt.cast('count(*)', dbt.type_bigint()) }} as n_train_rows,
        round(avg(user_activity), 9) as user_activity_mean,
        round(stddev_pop(user_activity), 9) as user_activity_std,
        round(avg(item_popularity), 9) as item_popularity_mean,
        round(stddev_pop(item_popularity), 9) as item_popularity_std,
        round(avg(item_age), 9) as item_age_mean,
        round(stddev_pop(item_age), 9) as item_age_std
    from imputed

)

select * from aggregated
