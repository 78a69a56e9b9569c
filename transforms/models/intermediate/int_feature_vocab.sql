-- categorical vocabularies (long format), fitted on the users and items that have train rows

with

user_vocab as (

    select user_id from {{ ref('int_user_vocab') }}

),

item_vocab as (

    select item_id from {{ ref('int_item_vocab') }}

),

users as (

    select * from {{ ref('stg_users') }}

),

items as (

    select * from {{ ref('stg_items') }}

),

train_users as (

    select users.*
    from users
    inner join user_vocab on user_vocab.user_id = users.user_id

),

train_items as (

    select items.*
    from items
    inner join item_vocab on item_vocab.item_id = items.item_id

),

observed as (

    select 'gender' as feature, gender as value from train_users
    union all
    select 'age' as feature, {{ dbt.cast('age', dbt.type_string()) }} as value from train_users
    union all
    select 'occupation' as feature, occupation as value from train_users
    union all
    select 'genre' as feature, primary_genre as value from train_items
    union all
    select 'year' as feature, {{ dbt.cast('release_decade', dbt.type_string()) }} as value from train_items

),

distinct_values as (

    select distinct feature, value
    from observed
    where value is not null

),

sortable as (

    select
        feature,
        value,
        -- numeric features sort by number ('1' < '18' < '25'), the others by text
        case
            when feature in ('age', 'year') then {{ dbt.cast('value', dbt.type_int()) }}
        end as numeric_value
    from distinct_values

),

indexed as (

    select
        feature,
        value,
        {{ dbt.cast('row_number() over (partition by feature order by numeric_value, value)', dbt.type_int()) }} as idx
    from sortable

)

select * from indexed
