-- one row: train-only mean and standard deviation of each dense feature (z-score parameters)

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

    select avg({{ dbt.cast('item_age', recsys.type_double()) }}) as item_age_mean
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
        avg(user_activity) as user_activity_mean,
        stddev_pop(user_activity) as user_activity_std,
        avg(item_popularity) as item_popularity_mean,
        stddev_pop(item_popularity) as item_popularity_std,
        avg(item_age) as item_age_mean,
        stddev_pop(item_age) as item_age_std
    from imputed

)

select * from aggregated
