{{ config(meta={"dagster": {"ref": {"name": "fct_ratings"}}}) }}

-- Vocabulary rule: every index is fitted on train rows only.
--  * every dim_users / dim_items row has >= 1 train event in fct_ratings, and n_train_events
--    equals that count; indices are 1..n without gaps;
--  * every train row has user_idx > 0 and item_idx > 0;
--  * a non-train row with user_idx / item_idx > 0 refers to a user / item with train rows;
--  * every value of a categorical vocabulary is carried by at least one train user / item.
-- Returns one row per violation (none = pass).

with

ratings as (

    select event_id, user_idx, item_idx, split from {{ ref('fct_ratings') }}

),

dim_users as (

    select * from {{ ref('dim_users') }}

),

dim_items as (

    select * from {{ ref('dim_items') }}

),

feature_vocab as (

    select * from {{ ref('int_feature_vocab') }}

),

train_user_counts as (

    select user_idx, count(*) as n_train_rows
    from ratings
    where split = 'train'
    group by user_idx

),

train_item_counts as (

    select item_idx, count(*) as n_train_rows
    from ratings
    where split = 'train'
    group by item_idx

),

user_dim_failures as (

    select
        'dim_users' as failure_in,
        {{ dbt.cast('dim_users.user_idx', dbt.type_bigint()) }} as ref_id,
        'user without train rows or wrong n_train_events' as failure
    from dim_users
    left join train_user_counts on train_user_counts.user_idx = dim_users.user_idx
    where train_user_counts.user_idx is null
       or dim_users.n_train_events < 1
       or dim_users.n_train_events <> train_user_counts.n_train_rows

),

item_dim_failures as (

    select
        'dim_items' as failure_in,
        {{ dbt.cast('dim_items.item_idx', dbt.type_bigint()) }} as ref_id,
        'item without train rows or wrong n_train_events' as failure
    from dim_items
    left join train_item_counts on train_item_counts.item_idx = dim_items.item_idx
    where train_item_counts.item_idx is null
       or dim_items.n_train_events < 1
       or dim_items.n_train_events <> train_item_counts.n_train_rows

),

contiguity_failures as (

    select 'dim_users' as failure_in, {{ dbt.cast('0', dbt.type_bigint()) }} as ref_id,
        'user_idx is not 1..n' as failure
    from dim_users
    having count(*) > 0 and (min(user_idx) <> 1 or max(user_idx) <> count(*))

    union all

    select 'dim_items' as failure_in, {{ dbt.cast('0', dbt.type_bigint()) }} as ref_id,
        'item_idx is not 1..n' as failure
    from dim_items
    having count(*) > 0 and (min(item_idx) <> 1 or max(item_idx) <> count(*))

),

row_failures as (

    select
        'fct_ratings' as failure_in,
        ratings.event_id as ref_id,
        case
            when ratings.split = 'train' and (ratings.user_idx = 0 or ratings.item_idx = 0)
                then 'train row outside the vocabulary'
            when ratings.user_idx > 0 and train_user_counts.user_idx is null
                then 'user_idx of a user without train rows'
            when ratings.item_idx > 0 and train_item_counts.item_idx is null
                then 'item_idx of an item without train rows'
        end as failure
    from ratings
    left join train_user_counts on train_user_counts.user_idx = ratings.user_idx
    left join train_item_counts on train_item_counts.item_idx = ratings.item_idx

),

used_feature_indices as (

    select distinct 'gender' as feature, gender_idx as idx from dim_users
    union all
    select distinct 'age' as feature, age_idx as idx from dim_users
    union all
    select distinct 'occupation' as feature, occupation_idx as idx from dim_users
    union all
    select distinct 'genre' as feature, genre_idx as idx from dim_items
    union all
    select distinct 'year' as feature, year_idx as idx from dim_items

),

feature_failures as (

    select
        'int_feature_vocab' as failure_in,
        {{ dbt.cast('feature_vocab.idx', dbt.type_bigint()) }} as ref_id,
        'value ' || feature_vocab.feature || '=' || feature_vocab.value || ' not carried by a train user/item' as failure
    from feature_vocab
    left join used_feature_indices
        on used_feature_indices.feature = feature_vocab.feature
        and used_feature_indices.idx = feature_vocab.idx
    where used_feature_indices.idx is null

),

all_failures as (

    select * from user_dim_failures
    union all
    select * from item_dim_failures
    union all
    select * from contiguity_failures
    union all
    select * from row_failures where failure is not null
    union all
    select * from feature_failures

)

select * from all_failures
